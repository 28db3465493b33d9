"""The epoch loop: streamed batches, Adam steps, metrics, checkpoint policy, clean interrupts."""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__
from ..ctf import batch_ctf
from ..data import BatchDataset, epoch_batches, make_loader
from ..progress import ProgressFactory, no_progress
from ..run import MetricsLog, checkpoint_payload
from ..runtime import rng_state
from .options import pose_search_epoch
from .setup import TrainingSetup

TERMS = ("loss", "log_lik", "kl_tr", "kl_theta", "kl_z", "consistency", "pose_nll")


class TrainingDiverged(Exception):
    """The loss became NaN/Inf; the message names the epoch and step."""


@dataclass
class TrainResult:
    epochs_done: int
    last_loss: float
    best_loss: float
    seconds: float
    particles_per_s: float
    interrupted: bool
    run_dir: Path


def checkpoints_due(epoch: int, epochs: int, every: int, is_best: bool) -> tuple[bool, bool]:
    """(write last.pt, write best.pt) after ``epoch``: last every ``every`` epochs and at the end,
    best whenever the epoch loss is the lowest so far."""
    return epoch % every == 0 or epoch == epochs, is_best


def fit(
    setup: TrainingSetup,
    progress: ProgressFactory | None = None,
    log=print,
) -> TrainResult:
    """Run the epochs from ``setup.start_epoch`` to ``opts.epochs``; log, record, checkpoint.

    Ctrl-C and SIGTERM stop after the step in progress, keeping the last checkpoint; a NaN loss
    raises TrainingDiverged naming epoch and step. Progress is shown on rank 0 only.
    """
    s, opts = setup, setup.opts
    n = len(s.stack)
    metrics = MetricsLog(s.run.metrics_path, s.start_epoch) if s.is_main else None
    logfile = s.run.log_path.open("a") if s.is_main else None

    def say(msg: str) -> None:
        if s.is_main:
            log(msg)
            logfile.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")
            logfile.flush()

    say(
        f"tvae-em {__version__}: {n} particles, box {s.stack.box}, "
        f"{s.model_cfg['likelihood']} likelihood, "
        f"CTF {'on' if s.ctf is not None else 'off'}, device {s.device}"
        f"{' (bf16 autocast)' if s.use_amp else ''}, world size {s.world}"
    )
    if s.start_epoch > 0:
        say(f"resuming from epoch {s.start_epoch} of {s.run.path}")

    dataset = BatchDataset(s.stack, s.norm)
    t_start, seen_total, interrupted = time.time(), 0, False
    last_loss, best = math.nan, s.best_loss
    epoch = s.start_epoch
    per_rank = -(-n // s.world)
    bar = progress if (progress is not None and s.is_main) else no_progress
    try:
        with (
            sigterm_as_interrupt(),
            bar(per_rank * (opts.epochs - s.start_epoch), "training") as advance,
        ):
            for epoch in range(s.start_epoch + 1, opts.epochs + 1):
                batches = epoch_batches(n, opts.batch_size, opts.seed, epoch, True, s.rank, s.world)
                loader = make_loader(dataset, batches, opts.num_workers)
                sums, seen, t0 = _run_epoch(s, loader, epoch, advance, len(batches))
                sums = _all_reduce(sums, s.device) if s.world > 1 else sums
                total = sums.pop("count")
                row = {k: v / total for k, v in sums.items()}
                dt = time.time() - t0
                seen_total += seen * s.world
                last_loss = row["loss"]
                final_band = s.band.k_max(epoch - 1e-9) is None  # this epoch ended at Nyquist
                if final_band:  # losses of narrower bands are not comparable
                    s.sched.step(last_loss)
                row.update(
                    epoch=epoch,
                    lr=s.optim.param_groups[0]["lr"],
                    particles_per_s=seen * s.world / dt,
                    seconds=dt,
                    k_max=_band_label(s, epoch),
                )
                if s.is_main:
                    metrics.append(row)
                    is_best = final_band and last_loss < best
                    best = min(best, last_loss) if final_band else best
                    _checkpoint(s, epoch, best, is_best)
                    say(
                        f"epoch {epoch}/{opts.epochs}: loss {last_loss:.4g} "
                        f"(log-lik {row['log_lik']:.4g}, KL t,r {row['kl_tr']:.3g}, "
                        f"theta {row['kl_theta']:.3g}, z {row['kl_z']:.3g}), "
                        f"{row['particles_per_s']:.1f} particles/s"
                    )
    except KeyboardInterrupt:
        interrupted = True
        kept = s.run.checkpoint_path("last").exists()
        say(
            f"interrupted in epoch {epoch}; the last checkpoint is kept: "
            f"resume with --resume {s.run.path}"
            if kept
            else f"interrupted in epoch {epoch}, before the first checkpoint: nothing to resume"
        )
    except TrainingDiverged as e:
        say(str(e))
        raise
    finally:
        if logfile is not None:
            logfile.close()
        if s.world > 1:
            # Free DDP's reducer while the process group is still registered: the last reference
            # to a gloo group dropped from the reducer's destructor joins the group's threads
            # with the GIL held and can deadlock (pytorch/pytorch#56297).
            s.train_model = s.model
            gc.collect()
            torch.distributed.destroy_process_group()
    seconds = time.time() - t_start
    return TrainResult(
        epochs_done=epoch if not interrupted else epoch - 1,
        last_loss=last_loss,
        best_loss=best,
        seconds=seconds,
        particles_per_s=seen_total / seconds if seconds > 0 else 0.0,
        interrupted=interrupted,
        run_dir=s.run.path,
    )


def _checkpoint(s: TrainingSetup, epoch: int, best: float, is_best: bool) -> None:
    """Write last.pt and/or best.pt as `checkpoints_due` says."""
    last, best_due = checkpoints_due(epoch, s.opts.epochs, s.opts.checkpoint_every, is_best)
    if not (last or best_due):
        return
    payload = checkpoint_payload(
        s.model,
        s.optim,
        s.sched,
        epoch,
        best,
        s.model_cfg,
        asdict(s.opts),
        s.norm,
        s.stack.fingerprint(),
        rng_state(),
    )
    if last:
        s.run.save_checkpoint("last", payload)
    if best_due:
        s.run.save_checkpoint("best", payload)


def _band_label(s: TrainingSetup, epoch: int) -> float | str:
    """metrics.csv's k_max: the band (cycles/pixel) at the end of the epoch; empty for the
    real-space renderer, which scores every pixel."""
    if s.model_cfg.get("renderer", "real") != "fourier":
        return ""
    k = s.band.k_max(epoch - 1e-9)
    return 0.5 if k is None else float(k)


def _run_epoch(s: TrainingSetup, loader, epoch: int, advance, n_steps: int):
    """One pass over the loader; returns summed per-image terms, images seen and the start time.

    The Fourier renderer's band grows step by step as `BandSchedule` says."""
    model, optim, device = s.train_model, s.optim, s.device
    model.train()
    sums = dict.fromkeys(TERMS, 0.0) | {"count": 0.0}
    seen, t0 = 0, time.time()
    apix = s.stack.apix if s.ctf is not None else None
    first = pose_search_epoch(s.opts, s.model_cfg["likelihood"])
    search = 0 < first <= epoch  # poses by search from this epoch on
    for step, (idx, y) in enumerate(loader, start=1):
        y = y.to(device, non_blocking=True)
        ctf = None if s.ctf is None else batch_ctf(s.ctf, apix, idx.numpy(), s.stack.box, device)
        k_max = s.band.k_max(epoch - 1 + (step - 1) / n_steps)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.use_amp):
            out = model(y, ctf=ctf, k_max=k_max, search=search)
        loss = -out["objective"].float().mean()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the loss became {loss.item()} in epoch {epoch}, step {step}; the last good "
                "checkpoint is kept (try a lower --lr)"
            )
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        b = y.shape[0]
        seen += b
        with torch.no_grad():
            sums["loss"] += loss.item() * b
            for k in TERMS[1:]:
                sums[k] += out[k].float().sum().item()
            sums["count"] += b
        advance(b)
    return sums, seen, t0


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM (kill, a scheduler's time limit) like Ctrl-C so the loop stops cleanly."""
    if threading.current_thread() is not threading.main_thread():  # signals need the main thread
        yield
        return
    old = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _all_reduce(sums: dict[str, float], device) -> dict[str, float]:
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))
