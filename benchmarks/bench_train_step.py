"""Training-step time, particles/s and peak memory of TargetVAE (forward + backward + Adam).

Examples:
    python benchmarks/bench_train_step.py                      # CPU, boxes 40 50 64 100, batch 64
    python benchmarks/bench_train_step.py --device cuda --amp  # CUDA with bf16 autocast
    python benchmarks/bench_train_step.py --box 50 --reference-like --steps 2
    python benchmarks/bench_train_step.py --box 50 --set encoder_fields=8 --set pixel_fraction=0.5
Random images stand in for data (the step's cost does not depend on the pixel values). Shared
machines give noisy times: the minimum over steps is the best estimate of the step's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch

from tvae_em.model import ModelConfig, TargetVAE

# The published model's cost in this code base: one lifting layer of 128 fields with a kernel about
# half the box, one 1x1 layer with the reference's FLOPs, 1024 Fourier features, every pixel.
REFERENCE_LIKE = dict(
    encoder_fields=128,
    encoder_hidden_fields=16,
    encoder_layers=1,
    fourier_features=1024,
    pixel_fraction=1.0,
)


def parse_set(items: list[str]) -> dict:
    """--set key=value pairs (values parsed as JSON where possible) -> dict."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def bench(box: int, args: argparse.Namespace, overrides: dict) -> dict:
    """Time `args.steps` training steps after `args.warmup` warm-up steps."""
    device = torch.device(args.device)
    cfg = ModelConfig(box=box, z_dim=args.z_dim, rotations=args.rotations, **overrides)
    model = TargetVAE(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    y = torch.randn(args.batch, box, box, device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        with amp:
            loss = -model(y)["objective"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    walls, cpus = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS
    best = min(walls)
    return {
        "box": box,
        "batch": args.batch,
        "device": args.device,
        "amp": args.amp,
        "step_s_min": round(best, 3),
        "step_s_median": round(statistics.median(walls), 3),
        "cpu_s_per_step_median": round(statistics.median(cpus), 3),
        "particles_per_s": round(args.batch / best, 1),
        "peak_mem_mb": round(peak_mb),
        "config": {
            k: v
            for k, v in cfg.to_dict().items()
            if k in overrides
            or k in ("encoder_kernel", "encoder_fields", "pixel_fraction", "fourier_features")
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--box", type=int, nargs="+", default=[40, 50, 64, 100])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rotations", type=int, default=8)
    p.add_argument("--z-dim", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--reference-like", action="store_true", help="the published model's cost")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ModelConfig field",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {**(REFERENCE_LIKE if args.reference_like else {}), **parse_set(args.set)}
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "load_avg": os.getloadavg(),
            }
        )
    )
    for box in args.box:
        print(json.dumps(bench(box, args, overrides)), flush=True)
    print(json.dumps({"load_avg_end": os.getloadavg()}))


if __name__ == "__main__":
    main()
