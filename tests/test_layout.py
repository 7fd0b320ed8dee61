"""The package imports only downwards: core <- model <- distributed <- io <- pipeline <- planner <- api."""

from __future__ import annotations

import ast
from pathlib import Path

import gptq_fsdp

PACKAGE = Path(gptq_fsdp.__file__).parent

# Lowest first; a module may import modules of its own or a lower rank (the longest prefix decides).
RANKS = {
    "gptq_fsdp.compat": 0,  # every private torch/DeepSpeed/transformers call
    "gptq_fsdp.core": 0,
    "gptq_fsdp.faults": 0,
    "gptq_fsdp.data": 0,
    "gptq_fsdp.evaluate": 0,
    "gptq_fsdp.config": 1,
    "gptq_fsdp.model": 2,
    "gptq_fsdp.distributed": 3,
    "gptq_fsdp.io": 4,
    "gptq_fsdp.pipeline": 5,
    "gptq_fsdp.io.checkpoint": 6,  # writes what the pipeline produced
    "gptq_fsdp.planner": 7,
    "gptq_fsdp.api": 8,
    "gptq_fsdp.integrations": 9,
    "gptq_fsdp.cli": 9,
    "gptq_fsdp.__main__": 10,
    "gptq_fsdp": 10,  # the package's own __init__
}


def rank_of(module: str) -> int:
    prefix = max((p for p in RANKS if module == p or module.startswith(p + ".")), key=len)
    return RANKS[prefix]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(path: Path) -> set[str]:
    """The package's modules that `path` imports (`from gptq_fsdp import faults` imports gptq_fsdp.faults)."""
    known, names = modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptq_fsdp"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if submodule in known else node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("gptq_fsdp"))
    return names


def test_imports_run_only_downwards():
    upward = [
        f"{module} (rank {rank_of(module)}) imports {target} (rank {rank_of(target)})"
        for module, path in sorted(modules().items())
        for target in sorted(imported(path))
        if rank_of(target) > rank_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_module_is_long():
    lines = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > 450}
    assert not long, long
