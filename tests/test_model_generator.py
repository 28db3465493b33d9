"""The spatial generator renders at any pose and size in the one pose convention."""

import math

import pytest
import torch

from tvae_em.geometry import pixel_grid, transform_images
from tvae_em.model import ModelConfig, TargetVAE


def smooth_model(box: int, likelihood: str = "gaussian") -> TargetVAE:
    """Fourier length scale 4 px: smooth renders, so bilinear interpolation is accurate."""
    cfg = ModelConfig(
        box=box,
        fourier_scale_px=4.0,
        generator_hidden=64,
        fourier_features=64,
        encoder_fields=2,
        encoder_hidden_fields=2,
        likelihood=likelihood,
    )
    return TargetVAE(cfg).eval()


def rel_rms(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[:, mask].pow(2).mean().sqrt() / a[:, mask].std())


def test_render_at_pose_equals_transformed_render_at_zero():
    """Tolerance: rms difference < 6% of the image sd inside the disc that stays in the box
    (measured 3.5% at box 33 with bilinear interpolation); the opposite angle is far off."""
    box = 33
    model = smooth_model(box)
    z = torch.randn(4, 2)
    theta = torch.tensor([0.7, -2.0, 3.0, 1.2])
    t = torch.tensor([[2.5, -1.5], [0.0, 3.0], [-4.0, 1.2], [1.0, 1.0]])
    with torch.no_grad():
        at_pose = model.render(z, theta, t)
        at_zero = model.render(z, torch.zeros(4), torch.zeros(4, 2))
    inside = pixel_grid(box).norm(dim=-1) < box / 2 - 6
    assert rel_rms(at_pose, transform_images(at_zero, theta, t), inside) < 0.06
    assert rel_rms(at_pose, transform_images(at_zero, -theta, t), inside) > 0.3
    assert rel_rms(at_pose, transform_images(at_zero, theta, -t), inside) > 0.3


def test_quarter_turn_and_integer_shift_are_exact():
    box = 21
    model = smooth_model(box)
    z = torch.randn(2, 2)
    theta = torch.full((2,), math.pi / 2)
    t = torch.tensor([[2.0, -1.0], [-3.0, 0.0]])
    with torch.no_grad():
        at_pose = model.render(z, theta, t)
        expected = transform_images(model.render(z, torch.zeros(2), torch.zeros(2, 2)), theta, t)
    inside = pixel_grid(box).norm(dim=-1) < box / 2 - 4
    torch.testing.assert_close(at_pose[:, inside], expected[:, inside], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_render_at_another_size_shows_the_same_object(likelihood):
    """Pixel 2p of a render at size 2D is pixel p of the render at D (same box coordinates);
    the shift is given in pixels of the render size."""
    box = 15
    model = smooth_model(box, likelihood)
    z, theta = torch.randn(3, 2), torch.tensor([0.3, 2.0, -1.0])
    t = torch.tensor([[1.0, -2.0], [0.0, 0.5], [3.0, 3.0]])
    with torch.no_grad():
        small = model.render(z, theta, t)
        big = model.render(z, theta, 2 * t, size=2 * box)
    c, c2 = box // 2, box  # centre pixels at size D and 2D
    idx = c2 + 2 * (torch.arange(box) - c)  # pixel 2p of the big render, p = offset from centre
    torch.testing.assert_close(big[:, idx][:, :, idx], small, atol=1e-5, rtol=1e-5)
    assert big.shape == (3, 30, 30)
    if likelihood == "bernoulli":
        assert (small > 0).all() and (small < 1).all()


def test_generator_depends_on_z():
    model = smooth_model(21)
    with torch.no_grad():
        a = model.render(torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 2))
        b = model.render(torch.ones(1, 2), torch.zeros(1), torch.zeros(1, 2))
    assert (a - b).abs().max() > 1e-3


class BlobGenerator(torch.nn.Module):
    """Stand-in generator: a Gaussian blob centred at `centre` (box units), whatever z."""

    def __init__(self, centre):
        super().__init__()
        self.centre = torch.tensor(centre)

    def forward(self, x, z):
        return torch.exp(-((x - self.centre) ** 2).sum(-1) / (2 * 0.1**2)) - 0.2


def test_template_centre_is_the_positive_centroid():
    box = 32
    model = smooth_model(box)
    model.generator = BlobGenerator([0.25, -0.125])  # (x, y) = (+4, -2) px at box 32
    centre = model.template_centre(torch.zeros(2, 2))
    torch.testing.assert_close(centre, torch.tensor([[4.0, -2.0]] * 2), atol=0.05, rtol=0)


class NegatedGenerator(torch.nn.Module):
    """A generator's output with the contrast reversed (a dark object on a light background)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, z):
        return 1.0 - self.inner(x, z)


def test_template_centre_of_a_dark_object():
    box = 32
    model = smooth_model(box)
    model.generator = NegatedGenerator(BlobGenerator([-0.25, 0.375]))  # (-4, +6) px
    centre = model.template_centre(torch.zeros(1, 2))
    torch.testing.assert_close(centre, torch.tensor([[-4.0, 6.0]]), atol=0.05, rtol=0)
