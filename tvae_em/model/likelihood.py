"""Pixel likelihoods p(y | generator output): Bernoulli on logits or Gaussian (unit/learned sd)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def choose_likelihood(sample_images: np.ndarray | torch.Tensor) -> str:
    """'bernoulli' when every pixel lies in [0, 1] (digit-like data), else 'gaussian'."""
    x = torch.as_tensor(
        np.asarray(sample_images) if not torch.is_tensor(sample_images) else sample_images
    )
    return "bernoulli" if bool((x.min() >= 0) & (x.max() <= 1)) else "gaussian"


class PixelLikelihood(nn.Module):
    """Sum over pixels of log p(y | out); `out` is a logit (Bernoulli) or the mean (Gaussian)."""

    def __init__(self, kind: str = "gaussian", learn_sigma: bool = False):
        super().__init__()
        self.kind = kind
        self.log_sigma = nn.Parameter(torch.zeros(())) if learn_sigma else None

    @property
    def sd(self) -> float:
        """The Gaussian noise sd (1 when it is not learnt: unit-variance images)."""
        return float(self.log_sigma.exp()) if self.log_sigma is not None else 1.0

    def forward(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """y, out: (B, P) -> (B,) log-likelihood summed over the P pixels."""
        out = out.float()
        if self.kind == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1)
        log_sigma = self.log_sigma if self.log_sigma is not None else out.new_zeros(())
        resid = (y - out) * torch.exp(-log_sigma)
        return (-0.5 * resid**2 - log_sigma - 0.5 * math.log(2 * math.pi)).sum(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """Image mean E[y | out]: sigmoid of the logits, or the Gaussian mean itself."""
        return torch.sigmoid(out) if self.kind == "bernoulli" else out
