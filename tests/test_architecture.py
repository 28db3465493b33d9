"""The layering rules of docs/architecture.md, checked on the source: they fail when broken."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tvae_em"
LEAVES = {"errors", "geometry", "fourier", "ctf", "progress", "runtime"}
CONSUMERS = {"training", "embed", "select", "generate"}


def _imports(path: Path) -> set[str]:
    """Top-level tvae_em modules imported by a file (relative or absolute imports)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ('tvae_em', 'io', 'cs')
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel[: len(rel) - node.level])
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [base + [a.name] for a in node.names]
            else:
                names = [(node.module or "").split(".")]
            for parts in names:
                if parts[:1] == ["tvae_em"] and len(parts) > 1:
                    out.add(parts[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "tvae_em" and len(parts) > 1:
                    out.add(parts[1])
    return out


def _top(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_leaves_import_only_leaves():
    for path in PACKAGE.glob("*.py"):
        if _top(path) in LEAVES:
            assert _imports(path) <= LEAVES, (path.name, _imports(path) - LEAVES)


def test_io_and_model_stay_below_the_library():
    allowed = {"io": LEAVES | {"io"}, "model": {"errors", "geometry", "fourier", "model"}}
    for part, ok in allowed.items():
        for path in (PACKAGE / part).rglob("*.py"):
            assert _imports(path) <= ok, (str(path), _imports(path) - ok)


def test_no_command_imports_another_and_no_consumer_imports_a_consumer():
    for path in (PACKAGE / "commands").glob("*.py"):
        own = path.stem
        for other in ("train", "embed", "select", "generate", "preprocess", "simulate"):
            if other != own:
                text = path.read_text()
                assert f"from .{other} import" not in text, (path.name, other)
    for path in PACKAGE.rglob("*.py"):
        top = _top(path)
        if top in CONSUMERS:
            assert not (_imports(path) & (CONSUMERS - {top})), (str(path), _imports(path))
        if top not in {"cli", "commands"}:
            assert "commands" not in _imports(path) and "cli" not in _imports(path), str(path)


def test_no_input_kind_tests_outside_io():
    pattern = re.compile(r"\.kind\s*(==|!=|in)\s*[\"'(]")
    for path in PACKAGE.rglob("*.py"):
        if _top(path) == "io":
            continue
        bad = [ln for ln in path.read_text().splitlines() if pattern.search(ln) and "stack" in ln]
        assert not bad, (str(path), bad)


def test_the_checker_sees_imports():
    """The rules above are only as good as _imports: it must find a known dependency."""
    assert {"run", "inference", "export", "clustering"} <= _imports(PACKAGE / "embed.py")
    assert "ctf" in _imports(PACKAGE / "io" / "ctf_columns.py")
