"""tvae-em: unsupervised pose and identity of cryo-EM particles with an equivariant VAE."""

__version__ = "0.1.0"
