"""The TARGET-VAE model core: encoder, posterior and priors, generator, likelihoods (no I/O)."""

from .config import ModelConfig
from .likelihood import choose_likelihood
from .vae import TargetVAE

__all__ = ["ModelConfig", "TargetVAE", "choose_likelihood"]
