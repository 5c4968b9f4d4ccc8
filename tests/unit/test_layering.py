"""The package's imports run one way (DESIGN.md, "Layout"), read from the source with ast.

    cli, demo -> data | train | serve | localcluster -> model | storage | rayenv -> config | errors

Among the middle row only train -> data (the dataset format) is allowed. Imports inside functions count:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "chatray"

LAYERS = {
    "cli": 3, "demo": 3, "__main__": 3,
    "data": 2, "train": 2, "serve": 2, "localcluster": 2,
    "model": 1, "storage": 1, "rayenv": 1, "raylogs": 1,
    "config": 0, "errors": 0,
}
# Edges between parts of the same layer that the design allows: training reads the dataset format, serving
# formats chats with the chat template the data was prepared with (for models that bring none), and a model is
# loaded from a checkpoint URI; connecting to Ray routes its output (raylogs); config errors are ChatrayErrors.
# Entry points (layer 3) may call each other.
ALLOWED_SIDEWAYS = {("train", "data"), ("serve", "data"), ("model", "storage"), ("rayenv", "raylogs"),
                    ("config", "errors")}


def _part(module: str) -> str | None:
    """``chatray.serve.engine`` -> ``serve``; ``chatray`` itself -> None."""
    names = module.split(".")
    return names[1] if names[0] == "chatray" and len(names) > 1 else None


def _source_part(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ``chatray...`` in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ["chatray", *path.relative_to(root).parent.parts]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("chatray")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "chatray":  # `from chatray import errors` names parts; `__version__` is the package's own
                out += [(node.lineno, f"chatray.{a.name}") for a in node.names
                        if (root / a.name).is_dir() or (root / f"{a.name}.py").is_file()]
            elif module.startswith("chatray."):
                out.append((node.lineno, module))
    return out


def _violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        src = _source_part(path, root)
        if src == "__init__":  # the package's own __init__ (chatray/__init__.py) imports nothing of its parts
            continue
        assert src in LAYERS, f"{path}: part {src!r} has no layer in this test (add it to LAYERS and DESIGN.md)"
        for line, module in _imports(path, root):
            dst = _part(module)
            if dst is None or dst == src:
                continue
            assert dst in LAYERS, f"{path}:{line}: imports unknown part {dst!r}"
            if LAYERS[dst] < LAYERS[src] or (src, dst) in ALLOWED_SIDEWAYS or LAYERS[src] == LAYERS[dst] == 3:
                continue
            problems.append(f"{path.relative_to(root)}:{line}: {src} (layer {LAYERS[src]}) imports {module} "
                            f"(layer {LAYERS[dst]})")
    return problems


def test_imports_run_one_way():
    problems = _violations()
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


@pytest.mark.parametrize("src, dst", [("serve", "train"), ("train", "serve"), ("data", "train"), ("data", "serve"),
                                      ("localcluster", "serve"), ("localcluster", "train"),
                                      ("localcluster", "data"), ("model", "data"), ("storage", "model"),
                                      ("config", "model"), ("rayenv", "localcluster")])
def test_forbidden_edges_are_reported(tmp_path, src, dst):
    """The check itself, on a package tree made here: each edge the design forbids is reported, lazy or not."""
    root = tmp_path / "chatray"
    for part in (src, dst):
        if part in ("config", "errors", "rayenv", "cli", "demo"):
            (root / f"{part}.py").parent.mkdir(parents=True, exist_ok=True)
            (root / f"{part}.py").touch()
        else:
            (root / part).mkdir(parents=True, exist_ok=True)
            (root / part / "__init__.py").touch()
    module = root / f"{src}.py" if (root / f"{src}.py").exists() else root / src / "thing.py"
    module.write_text(f"def f():\n    import chatray.{dst}\n")
    assert _violations(root) == [f"{module.relative_to(root)}:2: {src} (layer {LAYERS[src]}) imports chatray.{dst} "
                                 f"(layer {LAYERS[dst]})"]
    module.write_text("from chatray import errors\n")  # downwards: allowed
    (root / "errors.py").touch()
    assert _violations(root) == []


def test_import_reader_sees_lazy_and_relative_imports(tmp_path):
    root = tmp_path / "chatray"
    probe = root / "serve" / "probe.py"
    probe.parent.mkdir(parents=True)
    (root / "errors.py").touch()
    probe.write_text("def f():\n    from chatray.train import step\n\nfrom .. import errors\nfrom . import app\n")
    assert sorted(_imports(probe, root)) == [(2, "chatray.train"), (4, "chatray.errors"), (5, "chatray.serve")]
