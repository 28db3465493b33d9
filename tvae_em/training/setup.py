"""Set-up of a training run: inputs checked, run folder made or resumed, model, optimizer, CTF."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..ctf import CtfParams
from ..data import Normalisation, estimate_normalisation
from ..errors import UserError
from ..io import ParticleStack
from ..run import RunFolder, RunLock, read_metrics, run_config
from ..runtime import distributed_env, native_bf16, resolve_device, seed_everything, set_rng_state
from .options import BandSchedule, TrainOptions, band_schedule, model_config

# What a checkpoint must hold to be resumed.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_loss", "rng", "model_config")


@dataclass
class TrainingSetup:
    """Everything the epoch loop needs, ready to run."""

    opts: TrainOptions
    run: RunFolder
    stack: ParticleStack
    model: torch.nn.Module  # the TargetVAE whose state is checkpointed
    train_model: torch.nn.Module  # the same, possibly wrapped by DDP / torch.compile
    optim: torch.optim.Optimizer
    sched: Any
    model_cfg: dict[str, Any]
    norm: Normalisation
    ctf: CtfParams | None  # per-particle CTF parameters when CTF-aware training is on
    band: BandSchedule  # coarse-to-fine band of the Fourier renderer
    device: torch.device
    use_amp: bool
    start_epoch: int
    best_loss: float
    rank: int
    world: int
    lock: RunLock | None = None  # rank 0's hold of the run folder
    created: bool = False  # whether this session made the run folder

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def release(self, failed: bool = False) -> None:
        """Give up the run folder; after a failure, a folder this session made and that holds
        no checkpoint is removed (nothing is left behind)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if failed and self.created and self.is_main:
            self.run.discard()


def prepare(opts: TrainOptions, resume: bool = False, explicit: set[str] | None = None):
    """Check the input and options, create (or check for resume) the run folder, build or restore
    model, optimizer and scheduler, and write config.json. Returns a `TrainingSetup`.

    Every check runs before the folder is created or config.json rewritten; the folder is then
    held (`RunFolder.hold`) until `TrainingSetup.release`.
    """
    from ..model import ModelConfig, TargetVAE

    opts.check()
    rank, world, local_rank = distributed_env()
    run = RunFolder(opts.out_dir)
    device = resolve_device(opts.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)

    stack = ParticleStack.open(opts.input, datadir=opts.datadir, apix=opts.input_apix)
    _check_inputs(opts, stack)
    explicit = explicit or set()
    if resume:
        run.check_resume(run.saved_options(), asdict(opts), explicit)
        if not run.checkpoint_path("last").exists():
            raise UserError(f"--resume {run.path}: no checkpoint to resume from")
    else:
        seed_everything(opts.seed)
        cfg = model_config(opts, stack)
        ModelConfig(**cfg)  # every model setting checked before the folder is made
    ctf = _ctf_params(opts, stack)

    created = rank == 0 and not resume and not run.path.exists()
    lock = None
    try:
        if rank == 0:
            if not resume:
                run.create()
            lock = run.hold()
        ckpt = _resume_checkpoint(run, opts, stack, explicit) if resume else None
        if ckpt is None and rank == 0:
            run.check_new()
        if ckpt is not None:
            cfg = ckpt["model_config"]
            norm = Normalisation(**ckpt.get("normalisation", {}))
        else:
            norm = (
                estimate_normalisation(stack, seed=opts.seed)
                if cfg["likelihood"] == "gaussian"
                else Normalisation()
            )
        seed_everything(opts.seed)
        model = TargetVAE(ModelConfig(**cfg)).to(device)
        optim = torch.optim.Adam(model.parameters(), lr=opts.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optim, factor=0.5, patience=10)
        start_epoch, best = 0, math.inf
        if ckpt is not None:
            _restore(run, ckpt, model, optim, sched)
            start_epoch, best = int(ckpt["epoch"]), float(ckpt["best_loss"])
    except BaseException:
        if lock is not None:
            lock.release()
        if created:
            run.discard()
        raise

    train_model: torch.nn.Module = model
    if world > 1:
        train_model = _init_ddp(model, device)
    if opts.compile and device.type == "cuda":
        train_model = torch.compile(train_model)
    if rank == 0:
        run.write_config(
            run_config(
                asdict(opts),
                cfg,
                norm,
                stack.fingerprint(),
                len(stack),
                ctf is not None,
                str(device),
                world,
            )
        )
    return TrainingSetup(
        opts=opts,
        run=run,
        stack=stack,
        model=model,
        train_model=train_model,
        optim=optim,
        sched=sched,
        model_cfg=cfg,
        norm=norm,
        ctf=ctf,
        band=band_schedule(opts, cfg.get("renderer", "real")),
        device=device,
        use_amp=opts.amp and native_bf16(device),
        start_epoch=start_epoch,
        best_loss=best,
        rank=rank,
        world=world,
        lock=lock,
        created=created,
    )


def _check_inputs(opts: TrainOptions, stack: ParticleStack) -> None:
    n = len(stack)
    if n == 0:
        raise UserError(f"{opts.input}: no particles")
    if opts.batch_size < 1 or opts.batch_size > n:
        raise UserError(
            f"--batch-size {opts.batch_size}: must be between 1 and the {n} particles "
            f"of {opts.input}"
        )


def _resume_checkpoint(
    run: RunFolder, opts: TrainOptions, stack: ParticleStack, explicit: set[str]
) -> dict[str, Any]:
    """The last checkpoint of the run to resume (verified), after checking the data, the epochs
    and metrics.csv against it."""
    ckpt = run.load_checkpoint("last", "cpu")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UserError(
            f"{run.checkpoint_path('last')}: not a training checkpoint (no {', '.join(missing)}); "
            "it cannot be resumed"
        )
    if ckpt.get("fingerprint") != stack.fingerprint():
        raise UserError(f"--resume {run.path}: the run was trained on other data than {opts.input}")
    done = int(ckpt.get("epoch", 0))
    if opts.epochs <= done:
        given = f"--epochs {opts.epochs}" if "epochs" in explicit else f"--resume {run.path}"
        raise UserError(
            f"{given}: the run has already trained {done} epochs; give --epochs larger than "
            f"{done} to continue it"
        )
    if run.metrics_path.exists():
        read_metrics(run.metrics_path)
    return ckpt


def _restore(run: RunFolder, ckpt: dict[str, Any], model, optim, sched) -> None:
    """Load the states of a checkpoint into model, optimizer, scheduler and the RNGs."""
    try:
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UserError(
            f"{run.checkpoint_path('last')}: checkpoint does not match this version of tvae-em "
            f"({type(e).__name__}); resume with the version that wrote it"
        ) from None


def _ctf_params(opts: TrainOptions, stack: ParticleStack) -> CtfParams | None:
    """CtfParams when CTF-aware training is on (auto: when the star has defocus), else None."""
    if opts.ctf == "off":
        return None
    params = stack.ctf_params()
    if params is None and opts.ctf == "on":
        raise UserError(f"--ctf: {opts.input} has no defocus columns (use --no-ctf)")
    return params


def _init_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return torch.nn.parallel.DistributedDataParallel(model)
