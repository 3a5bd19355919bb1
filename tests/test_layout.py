"""The package's layering, read off its imports: every module imports only from the layers
below its own (README "Layout"), and opens with a docstring saying what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prng_daemon"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("document",),
    ("config", "log"),
    ("ledger", "watcher", "llm"),
    ("servers",),
    ("handlers",),
    ("recovery",),
    ("engine", "service", "reload", "sdk"),
    ("commands",),
    ("daemon",),
    ("demo",),
    ("cli",),
    ("__main__",),
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _unit(module: str) -> str:
    """The folder or top-level module of `prng_daemon.<unit>...`; "" for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imported(module: str, path: Path) -> set[str]:
    """The prng_daemon modules (or names in them) `module` imports."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if path.name != "__init__.py":
                    base = base[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("prng_daemon"):
                target = node.module
            else:
                continue
            if node.module is None:  # from . import a, b: modules of that package
                targets.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                targets.add(target)
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith("prng_daemon"))
    return targets


def test_every_folder_and_top_module_has_a_layer() -> None:
    units = {_unit(m) for m in _modules()} - {""}
    assert units == set(RANK), "README 'Layout' and LAYERS name every part of the package"


def test_every_import_goes_down_the_layers() -> None:
    upward = []
    for module, path in _modules().items():
        here = _unit(module)
        for target in _imported(module, path):
            there = _unit(target)
            if there in ("", "__version__", here) or there not in RANK:
                continue  # the package's own face, the same part
            if RANK[there] >= RANK.get(here, len(LAYERS)):
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that go up or sideways:\n" + "\n".join(sorted(upward))


def test_every_module_says_what_it_is_for() -> None:
    silent = [m for m, p in _modules().items() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not silent, f"modules without an opening docstring: {silent}"
