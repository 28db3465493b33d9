"""The encoder head's output layout: which field of the per-cell maps holds what.

The encoder writes maps (B, F, N, S, S) with F = 3 + 2 * z_dim fields per rotation bin and cell;
this is the one place that says which field is which (encoder and posterior both use it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadLayout:
    """Field indices of the encoder head: attention logit, rotation offset mean and log-sd (rad),
    then z means and z log-sds."""

    z_dim: int

    attention: int = 0
    theta_mu: int = 1
    theta_logsd: int = 2
    fixed: int = 3  # fields before the latent ones

    @classmethod
    def from_fields(cls, n_fields: int) -> HeadLayout:
        """The layout of maps with ``n_fields`` fields (3 + 2 * z_dim)."""
        z_dim, odd = divmod(n_fields - cls.fixed, 2)
        if odd or z_dim < 1:
            raise ValueError(f"encoder maps with {n_fields} fields are not 3 + 2 * z_dim")
        return cls(z_dim)

    @property
    def n_fields(self) -> int:
        return self.fixed + 2 * self.z_dim

    @property
    def z_mu(self) -> slice:
        return slice(self.fixed, self.fixed + self.z_dim)

    @property
    def z_logsd(self) -> slice:
        return slice(self.fixed + self.z_dim, self.fixed + 2 * self.z_dim)
