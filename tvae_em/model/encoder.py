"""C_N- and translation-equivariant encoder: learned rotated template matching on e2cnn.

One lifting R2Conv (trivial -> regular fields) with a kernel about the object's size, applied as an
exact linear 'same' correlation (direct or through the FFT), then 1x1 regular -> regular R2Convs
with LeakyReLU (pointwise, so equivariant on regular fields) and 1x1 heads. No stride or pooling:
the output maps keep the input's pixel grid, on the centred window of pixels that the shift prior
can reach (`ModelConfig.cell_side`; only that window is computed). The rotation axis is reordered
so that rotating the input by +2*pi/N (``geometry.transform_images``) moves the maps from bin r to
bin r + 1.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from e2cnn import gspaces
from e2cnn import nn as enn
from torch import nn

from .config import ModelConfig
from .layout import HeadLayout

LEAKY_SLOPE = 0.01


def _fast_len(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _non_persistent(module: nn.Module) -> nn.Module:
    """Keep e2cnn's derived buffers (sampled bases, cached filters) out of the state_dict."""
    for m in module.modules():
        m._non_persistent_buffers_set.update(m._buffers.keys())
    return module


def fft_correlate(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """Exact linear 'same' cross-correlation (as F.conv2d, padding k//2) of x with an odd filter.

    x: (B, 1, D, D); filt: (C, 1, k, k) -> (B, C, D, D). Computed in float32 whatever autocast says.
    The zero padding to n >= D + k - 1 makes the circular FFT correlation equal the linear one.
    """
    d, k = x.shape[-1], filt.shape[-1]
    n, p = _fast_len(d + k - 1), k // 2
    with torch.autocast(x.device.type, enabled=False):
        # filter placed with its centre at index 0 (wrapped) so output index equals pixel index
        fpad = F.pad(filt[:, 0].float(), (0, n - k, 0, n - k)).roll((-p, -p), dims=(-2, -1))
        xf = torch.fft.rfft2(x[:, 0].float(), s=(n, n))  # (B, n, n//2+1)
        wf = torch.fft.rfft2(fpad).conj()  # (C, n, n//2+1)
        out = torch.fft.irfft2(xf[:, None] * wf[None], s=(n, n))  # (B, C, n, n)
        return out[..., :d, :d]


def use_fft(box: int, kernel: int, side: int | None = None) -> bool:
    """True where FFT correlation beats direct convolution for `side` x `side` outputs of a box.

    Direct cost grows with the outputs (side^2 k^2), the FFT's with the padded box only; the
    constant is the measured full-box crossover near box 55-60.
    """
    side = box if side is None else side
    n = _fast_len(box + kernel - 1)
    return side * side * kernel * kernel > 30 * n * n * math.log2(n * n)


def window_offset(box: int, side: int) -> int:
    """First row (and column) of the centred side x side window: its centre is pixel box//2."""
    return box // 2 - side // 2


def correlate(
    x: torch.Tensor, filt: torch.Tensor, bias: torch.Tensor, side: int | None = None
) -> torch.Tensor:
    """Linear 'same' correlation (B, 1, D, D) x (C, 1, k, k) + bias (C,) -> (B, C, S, S).

    Only the centred S x S window of the output (`window_offset`; S = `side`, None: D) is
    computed. Direct convolution of the input region it needs (zero outside the box) or FFT
    with the output cropped, whichever is faster for this size; both equal the full-box result
    cropped.
    """
    d, k = x.shape[-1], filt.shape[-1]
    side = d if side is None else side
    o, p = window_offset(d, side), k // 2
    if use_fft(d, k, side):
        out = fft_correlate(x, filt)[..., o : o + side, o : o + side]
        return out + bias[None, :, None, None]
    filt, bias = filt.to(x.dtype), bias.to(x.dtype)
    if side == d:
        return F.conv2d(x, filt, bias, padding=p)
    lo, hi = p - o, o + side + p - d  # padding (negative: cropping) before and after
    region = F.pad(x, (lo, hi, lo, hi))  # (B, 1, S + k - 1, S + k - 1)
    return F.conv2d(region, filt, bias)


class FFTLiftingConv(nn.Module):
    """Lifting R2Conv (1 trivial -> `fields` regular fields), evaluated by FFT correlation."""

    def __init__(self, gspace, fields: int, kernel: int, side: int | None = None):
        super().__init__()
        self.side = side  # output window side (None: the whole box)
        in_type = enn.FieldType(gspace, [gspace.trivial_repr])
        out_type = enn.FieldType(gspace, [gspace.regular_repr] * fields)
        self.conv = _non_persistent(enn.R2Conv(in_type, out_type, kernel, padding=kernel // 2))

    def train(self, mode: bool = True) -> FFTLiftingConv:
        """Only flag the mode: e2cnn's eval hook would cache filters we never use."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        filt, bias = self.conv.expand_parameters()  # (C, 1, k, k), (C,)
        return correlate(x, filt, bias, self.side)  # (B, C, S, S)

    def export(self) -> nn.Module:
        """The same layer with a fixed plain-torch filter."""
        with torch.no_grad():
            filt, bias = self.conv.expand_parameters()
        return FixedFFTConv(filt.detach().clone(), bias.detach().clone(), self.side)


class FixedFFTConv(nn.Module):
    """Exported lifting layer: `correlate` with a stored filter (no e2cnn), same output window."""

    def __init__(self, filt: torch.Tensor, bias: torch.Tensor, side: int | None = None):
        super().__init__()
        self.side = side
        self.register_buffer("filt", filt)  # (C, 1, k, k)
        self.register_buffer("bias", bias)  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return correlate(x, self.filt, self.bias, self.side)


class Regular1x1(nn.Module):
    """1x1 R2Conv between regular fields (a group convolution over C_N at every pixel).

    Applied channels-last as a linear map, which is faster than conv2d on CPU.
    """

    def __init__(self, gspace, fields_in: int, fields_out: int):
        super().__init__()
        in_type = enn.FieldType(gspace, [gspace.regular_repr] * fields_in)
        out_type = enn.FieldType(gspace, [gspace.regular_repr] * fields_out)
        self.conv = _non_persistent(enn.R2Conv(in_type, out_type, 1))

    def train(self, mode: bool = True) -> Regular1x1:
        """Only flag the mode (see FFTLiftingConv.train)."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last x (..., C_in) -> (..., C_out)."""
        w, b = self.conv.expand_parameters()  # (C_out, C_in, 1, 1), (C_out,)
        return F.linear(x, w[:, :, 0, 0], b)

    def export(self) -> nn.Module:
        """A plain nn.Linear (channels-last 1x1 convolution) with the expanded weights."""
        with torch.no_grad():
            w, b = self.conv.expand_parameters()
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w[:, :, 0, 0])
        lin.bias.data.copy_(b)
        return lin


class EquivariantEncoder(nn.Module):
    """Image (B, D, D) -> per-cell maps (B, F, N, S, S), fields laid out as `HeadLayout` says.

    Axis 2 is the rotation bin r (angle 2*pi*r/N); axes 3, 4 are the centred S x S window of
    pixels (S = `ModelConfig.cell_side`, `window_offset`): the full-box maps cropped.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.rotations
        self.rotations = n
        self.layout = HeadLayout(cfg.z_dim)
        self.out_fields = self.layout.n_fields
        gs = gspaces.Rot2dOnR2(n)
        self.side = cfg.cell_side
        self.lift = FFTLiftingConv(gs, cfg.encoder_fields, cfg.encoder_kernel, self.side)
        width, hidden = cfg.encoder_fields, []
        for _ in range(cfg.encoder_layers):
            hidden.append(Regular1x1(gs, width, cfg.encoder_hidden_fields))
            width = cfg.encoder_hidden_fields
        self.hidden = nn.ModuleList(hidden)
        self.head = Regular1x1(gs, width, self.out_fields)
        with torch.no_grad():
            # start with a rotation sd equal to the prior's (pi/N) and z sd of 1
            self.head.conv.bias[self.layout.theta_logsd] = math.log(math.pi / n)
        # e2cnn's generator rotates the other way in (row, col) arrays: bin r <- e2cnn bin -r
        self.register_buffer("bin_order", (-torch.arange(n)) % n, persistent=False)
        gain = torch.ones(self.out_fields, 1)
        gain[self.layout.attention] = cfg.attention_gain
        self.register_buffer("field_gain", gain, persistent=False)  # (F, 1)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        b, s = y.shape[0], self.side
        h = F.leaky_relu(self.lift(y[:, None]), LEAKY_SLOPE, inplace=True)  # (B, C, S, S)
        h = h.permute(0, 2, 3, 1)  # (B, S, S, C) channels-last view
        for layer in self.hidden:
            h = F.leaky_relu(layer(h), LEAKY_SLOPE, inplace=True)  # (B, S, S, C')
        h = self.head(h)  # (B, S, S, F * N), field-major channels
        h = h.reshape(b, s, s, self.out_fields, self.rotations).index_select(4, self.bin_order)
        return (h * self.field_gain).permute(0, 3, 4, 1, 2)  # (B, F, N, S, S)

    def export(self) -> EquivariantEncoder:
        """A copy whose e2cnn layers are replaced by plain-torch equivalents (for inference)."""
        out = copy.deepcopy(self)
        out.lift = self.lift.export()
        out.hidden = nn.ModuleList([m.export() for m in self.hidden])
        out.head = self.head.export()
        return out
