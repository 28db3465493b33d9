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
from ..run import RunFolder, run_config
from ..runtime import distributed_env, resolve_device, seed_everything, set_rng_state
from .options import BandSchedule, TrainOptions, band_schedule, check_options, model_config


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

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare(opts: TrainOptions, resume: bool = False, explicit: set[str] | None = None):
    """Check the input and options, create (or check for resume) the run folder, build or restore
    model, optimizer and scheduler, and write config.json. Returns a `TrainingSetup`."""
    from ..model import ModelConfig, TargetVAE

    check_options(opts)
    rank, world, local_rank = distributed_env()
    run = RunFolder(opts.out_dir)
    device = resolve_device(opts.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local_rank)

    stack = ParticleStack.open(opts.input, datadir=opts.datadir, apix=opts.input_apix)
    _check_inputs(opts, stack)
    ckpt = _resume_checkpoint(run, opts, stack, explicit or set()) if resume else None
    if ckpt is None and rank == 0:
        run.create()

    if ckpt is not None:
        cfg = ckpt["model_config"]
        norm = Normalisation(**ckpt["normalisation"])
    else:
        seed_everything(opts.seed)
        cfg = model_config(opts, stack)
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
        model.load_state_dict(ckpt["model"])
        optim.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, best = int(ckpt["epoch"]), float(ckpt["best_loss"])
        set_rng_state(ckpt["rng"])

    ctf = _ctf_params(opts, stack)
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
        use_amp=opts.amp and device.type == "cuda",
        start_epoch=start_epoch,
        best_loss=best,
        rank=rank,
        world=world,
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
    if opts.epochs < 1:
        raise UserError(f"--epochs {opts.epochs}: must be at least 1")


def _resume_checkpoint(
    run: RunFolder, opts: TrainOptions, stack: ParticleStack, explicit: set[str]
) -> dict[str, Any]:
    """The last checkpoint of the run to resume, after checking options and data against it."""
    run.check_resume(run.saved_options(), asdict(opts), explicit)
    if not run.checkpoint_path("last").exists():
        raise UserError(f"--resume {run.path}: no checkpoint to resume from")
    ckpt = run.load_checkpoint("last", "cpu")
    if ckpt.get("fingerprint") != stack.fingerprint():
        raise UserError(f"--resume {run.path}: the run was trained on other data than {opts.input}")
    return ckpt


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
