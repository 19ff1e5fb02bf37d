"""The packages' layers (docs/design.md, "Layers"): no module imports from a layer above its own.

    0 ground floor  storage, errors, formats, manifest, configio, decode, schema, layout
    1 training      training.*   (model loading included)
    2 eval          eval.*
    2 stages        the rest of pipeline: the stages, their machinery (stage, runner, shuffle), config, web
    3 front door    cli, demo, submit, launch, configdoc, ablate

Eval and the stages stand side by side above training: neither imports the other
(the filter's CLIP score and semantic dedup load models from training, not from eval).
Every import counts, those inside functions too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "training", "eval", "infra")
GROUND = {
    "pipeline",  # the package's __init__: version and thread settings only
    "pipeline.errors",
    "pipeline.storage",
    "pipeline.formats",
    "pipeline.manifest",
    "pipeline.configio",
    "pipeline.decode",
    "pipeline.schema",
    "pipeline.layout",
    "pipeline.evaldata",  # evaluation datasets as bytes: read by eval and by the filter's decontamination
}
FRONT_DOOR = {
    "pipeline.cli",
    "pipeline.__main__",
    "pipeline.demo",
    "pipeline.submit",
    "pipeline.launch",
    "pipeline.configdoc",
    "pipeline.ablate",
}
NAMES = ("ground floor", "training", "eval", "stages", "front door")
RANK = (0, 1, 2, 2, 3)  # eval and stages share a floor


def layer(module: str) -> int | None:
    """The layer of a clipline module, an index of NAMES (see the module docstring); None outside clipline."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if module in GROUND:
        return 0
    if top == "training":
        return 1
    if top == "eval":
        return 2
    if module in FRONT_DOOR:
        return 4
    return 3  # pipeline.* (and infra, which has no code)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, relative ones resolved against `module`."""
    here = module.split(".") if is_package else module.split(".")[:-1]  # the package a relative import starts in
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here[: len(here) - node.level + 1]
                base = ".".join([*package, base] if base else package)
            # `from pipeline import layout` imports the module pipeline.layout
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
            found.append((node.lineno, base))
    return found


def resolve(name: str) -> str:
    """The longest prefix of `name` that is a clipline module file or package (drops imported attributes)."""
    parts = name.split(".")
    while parts:
        candidate = ROOT.joinpath(*parts)
        if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
            return ".".join(parts)
        parts.pop()
    return name


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer(module)
    out = []
    for line, name in imported_modules(source, module, is_package):
        target = resolve(name)
        theirs = layer(target)
        if theirs is None or own is None or theirs == own:
            continue
        if RANK[theirs] >= RANK[own]:  # above, or a sibling on the same floor
            out.append(f"{module}:{line} ({NAMES[own]}) imports {target} ({NAMES[theirs]})")
    return sorted(set(out))


def all_modules() -> list[tuple[str, Path]]:
    return [(module_name(p), p) for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def test_no_module_imports_from_a_layer_above_its_own():
    found = [
        v for module, path in all_modules() for v in violations(path.read_text(), module, path.name == "__init__.py")
    ]
    assert found == []


def test_every_layer_is_populated_and_every_module_has_one():
    layers = {layer(module) for module, _ in all_modules()}
    assert layers == {0, 1, 2, 3, 4}
    assert all(ROOT.joinpath(*m.split(".")).with_suffix(".py").exists() for m in GROUND - {"pipeline"})
    assert all(ROOT.joinpath(*m.split(".")).with_suffix(".py").exists() for m in FRONT_DOOR)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("training.trainer", "def f():\n    from eval.run import evaluate\n", ["eval.run (eval)"]),
        ("pipeline.storage", "from pipeline import layout, stage\n", ["pipeline.stage (stages)"]),
        ("eval.run", "import pipeline.cli\n", ["pipeline.cli (front door)"]),
        ("pipeline.dedup.edges", "from .semantic import emit_semantic\nfrom training.model import CLIP\n", []),
        ("pipeline.filter", "from pipeline.launch import train\n", ["pipeline.launch (front door)"]),
        ("pipeline", "from . import demo\n", ["pipeline.demo (front door)"]),
        ("pipeline.clip_score", "from eval.run import load_model\n", ["eval.run (eval)"]),  # siblings
        ("eval.datasets", "from pipeline.filter import domain_of\n", ["pipeline.filter (stages)"]),
        ("eval.datasets", "from pipeline.decode import decode_image\nfrom training import model\n", []),
    ],
)
def test_the_check_finds_upward_imports_lazy_ones_too(module, source, expected):
    found = violations(source, module, is_package="." not in module)
    assert [v.split(" imports ")[1] for v in found] == expected
