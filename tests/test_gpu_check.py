"""benchmarks/gpu_check.py at toy size on the CPU: the GPU check script itself works."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_at_toy_size_and_its_checks_pass(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    rows = module.run(["--toy", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    checks = [r["check"] for r in rows]
    assert checks.count("agreement") == 4 and {"bf16", "train", "embed"} <= set(checks)
    assert all(r["ok"] for r in rows if "ok" in r), [r for r in rows if not r.get("ok", True)]
    assert all(r["particles_per_s"] > 0 for r in rows if "particles_per_s" in r)
