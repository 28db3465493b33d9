"""Batches of particle images for training and inference, streamed from a lazy ParticleStack.

A batch is read in one `ParticleStack.read` call (sorted indices, memory-mapped files), so memory
does not grow with the number of particles and DataLoader workers reopen the maps themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import UserError


@dataclass
class Normalisation:
    """Global intensity standardisation applied to every image before the model: (x - mean) / sd."""

    mean: float = 0.0
    sd: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.sd


def estimate_normalisation(stack, n_sample: int = 1000, seed: int = 0) -> Normalisation:
    """Mean and sd of pixel values over a random sample of particles (global, as cryoDRGN)."""
    rng = np.random.default_rng(seed)
    n = len(stack)
    idx = np.sort(rng.choice(n, size=min(n, n_sample), replace=False))
    x = stack.read(idx)
    stack.check_pixels(idx, x)
    x = x.astype(np.float64)
    sd = float(x.std())
    return Normalisation(mean=float(x.mean()), sd=sd if sd > 0 else 1.0)


class BatchDataset(Dataset):
    """Dataset whose items are whole batches: index list -> (indices, images (B, D, D) float32)."""

    def __init__(self, stack, norm: Normalisation | None = None):
        self.stack = stack
        self.norm = norm

    def __len__(self) -> int:
        return len(self.stack)

    def __getitem__(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        x = self.stack.read(idx)
        if self.norm is not None:
            x = self.norm.apply(x)
        return torch.from_numpy(idx), torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def epoch_batches(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
) -> list[np.ndarray]:
    """The batches of one epoch for one rank: a permutation fixed by (seed, epoch), split by rank.

    Deterministic in (seed, epoch) so a resumed run sees the same batches as an uninterrupted one.
    With several ranks every rank gets the same number of batches (the permutation is padded by
    wrapping around, as DistributedSampler does).
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    if world_size > 1:
        per_rank = -(-n // world_size)
        order = np.resize(order, per_rank * world_size)[rank::world_size]
    m = len(order)
    stop = m - m % batch_size if drop_last and m >= batch_size else m
    return [order[i : min(i + batch_size, stop)] for i in range(0, stop, batch_size)]


def check_num_workers(num_workers: int) -> None:
    """UserError unless --num-workers is a number of processes (0: load in the main process)."""
    if not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"--num-workers {num_workers}: must be 0 or more")


class CheckedLoader:
    """Iterates a DataLoader of (indices, images), refusing images with NaN or Inf pixels.

    The check runs in the main process (a UserError raised in a worker would come back with the
    worker's traceback in its message) and names the particle; normalisation keeps pixels finite
    when they were, so checking the normalised images is enough.
    """

    def __init__(self, loader: DataLoader, stack) -> None:
        self.loader = loader
        self.stack = stack

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx, y in self.loader:
            if not torch.isfinite(y).all():
                self.stack.check_pixels(idx.numpy(), y.numpy())
            yield idx, y


def make_loader(
    dataset: BatchDataset, batches: list[np.ndarray], num_workers: int
) -> CheckedLoader:
    """A DataLoader over precomputed batches (no re-batching, optional worker processes) whose
    images are checked for NaN/Inf pixels (UserError naming the particle)."""
    check_num_workers(num_workers)
    loader = DataLoader(
        dataset,
        sampler=batches,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return CheckedLoader(loader, dataset.stack)
