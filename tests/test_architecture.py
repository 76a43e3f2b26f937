"""The package map of README's "How it fits together": no module imports a package above it."""
import ast
from pathlib import Path

import dsd

ROOT = Path(dsd.__file__).parent
# Lowest first; a package may import its own modules and any package on a lower level.
LEVELS = [
    {"errors"},
    {"fileio", "images", "modes", "module_tree", "kernels"},
    {"flops"},
    {"layers", "zoo"},
    {"timing"},  # its cache keys on the layers' switches
    {"calibration"},
    {"convert"},
    {"savings"},
    {"io"},
    {"finetune"},
    {"validation"},
    {"demo"},
    {"cli"},
    {"__main__"},  # python -m dsd
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _package(module: str) -> str:
    """``dsd.convert.plan`` -> ``convert``; the root package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path):
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        module = module.rsplit(".", 1)[0]
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):  # lazy imports inside functions count too
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            yield module, names
        elif isinstance(node, ast.Import):
            yield module, [a.name for a in node.names]


def test_every_package_is_on_the_map():
    found = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert found == set(LEVEL)


def test_no_module_imports_a_package_above_it():
    wrong = []
    for path in ROOT.rglob("*.py"):
        if path == ROOT / "__init__.py":
            continue  # the root re-exports the public API
        for module, targets in _imports(path):
            here = _package(module)
            for target in targets:
                if not target.startswith("dsd.") and target != "dsd":
                    continue
                there = _package(target)
                if there in ("", "__version__") or there == here:
                    continue
                if there not in LEVEL or LEVEL[there] >= LEVEL[here]:
                    wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)
