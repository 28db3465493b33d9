"""A short CPU training on rotated and shifted glyphs recovers the rotation and the shift."""

import math
import time

import torch
import torch.nn.functional as F

from tvae_em.geometry import rotation_matrix, transform_images, wrap_angle
from tvae_em.metrics import circular_correlation
from tvae_em.metrics import pearson_r as pearson
from tvae_em.model import ModelConfig, TargetVAE

BOX, N_IMAGES, T_SD, EPOCHS, BATCH = 32, 256, 2.5, 12, 32


def glyph(box: int) -> torch.Tensor:
    """An asymmetric 'F' of three strokes, slightly blurred, values in [0, 1], about 15 px tall."""
    img = torch.zeros(box, box)
    c = box // 2
    for r0, r1, c0, c1 in [(-7, 8, -4, -1), (-7, -4, -1, 6), (-1, 2, -1, 3)]:
        img[c + r0 : c + r1, c + c0 : c + c1] = 1.0
    k = torch.tensor([0.25, 0.5, 0.25])
    return F.conv2d(img[None, None], (k[:, None] * k[None])[None, None], padding=1)[0, 0]


def test_short_training_recovers_rotation_and_shift():
    torch.manual_seed(0)
    theta = (torch.rand(N_IMAGES) * 2 - 1) * math.pi  # uniform rotation
    t = torch.randn(N_IMAGES, 2) * T_SD  # Gaussian shift, pixels (x, y)
    template = glyph(BOX).expand(N_IMAGES, BOX, BOX).contiguous()
    y = transform_images(template, theta, t).clamp(0, 1)
    cfg = ModelConfig(
        box=BOX,
        z_dim=1,
        rotations=8,
        t_sd_px=T_SD,
        likelihood="bernoulli",
        generator_hidden=128,
        fourier_features=128,
    )
    model = TargetVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    start = time.time()
    for _ in range(EPOCHS):
        for idx in torch.randperm(N_IMAGES).split(BATCH):
            loss = -model(y[idx])["elbo"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        e = model.embed(y)
        # the paper's correction for the learned canonical frame: predictions on the unshifted
        # glyph at the same angles give the template's origin offset R(theta) c to subtract
        ref = model.embed(transform_images(template, theta, torch.zeros(N_IMAGES, 2)))
        # the centred glyph turned bin by bin; the 10-degree offset keeps every copy interpolated
        # like the training images (exact 0/90-degree copies are sharper than anything trained on)
        quarter = torch.arange(8) * (2 * math.pi / 8) + math.radians(10)
        turned = model.embed(transform_images(template[:8], quarter, torch.zeros(8, 2)))
        # without reference images: shifts relative to the learned template's centroid
        centre = model.template_centre(e["z_mu"])
        t_cen = e["t"] + torch.einsum("bij,bj->bi", rotation_matrix(e["theta"]), centre)
    rot = circular_correlation(e["theta"], theta)
    t_corr = e["t"] - ref["t"]
    rx, ry = pearson(t_corr[:, 0], t[:, 0]), pearson(t_corr[:, 1], t[:, 1])
    raw_x, raw_y = pearson(e["t"][:, 0], t[:, 0]), pearson(e["t"][:, 1], t[:, 1])
    cen_x, cen_y = pearson(t_cen[:, 0], t[:, 0]), pearson(t_cen[:, 1], t[:, 1])
    steps = wrap_angle(turned["theta"].roll(-1) - turned["theta"])
    print(
        f"\nlearning test ({time.time() - start:.0f} s, {EPOCHS * N_IMAGES // BATCH} steps): "
        f"rotation circular correlation {rot:.3f}; shift Pearson r x {rx:.3f} y {ry:.3f} "
        f"(raw: x {raw_x:.3f} y {raw_y:.3f}; relative to the template centroid: "
        f"x {cen_x:.3f} y {cen_y:.3f}); "
        f"45-degree steps of theta_hat (deg) {[round(math.degrees(s)) for s in steps]}; "
        f"winning bins {turned['r'].tolist()}"
    )
    assert rot > 0.8
    assert rx > 0.8 and ry > 0.8
    assert cen_x > 0.75 and cen_y > 0.75  # the glyph's centroid is not its rotation centre
    # each 45-degree turn of the input turns theta_hat by 45 degrees, and the winning bin follows:
    # it advances by 0-2 bins per turn (the in-bin offset absorbs the rest), 8 bins per full turn
    assert (steps - math.pi / 4).abs().max() < math.radians(15)
    bin_steps = (turned["r"].roll(-1) - turned["r"]) % 8
    assert bin_steps.max() <= 2 and int(bin_steps.sum()) == 8
