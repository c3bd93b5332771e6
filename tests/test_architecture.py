"""The dependency rule of docs/architecture.md, read from the imports: each layer imports inward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import order_pipeline

PACKAGE = Path(order_pipeline.__file__).parent

# Innermost first; a module may import its own layer and the layers before it.
LAYERS: list[tuple[str, set[str]]] = [
    ("model", {"kinds", "model", "seldom", "serialization"}),
    ("store", {"store"}),
    ("orchestration", {"orchestrator"}),
    ("domain services", {"services", "desk"}),
    ("operations", {"settings", "logs", "metrics", "reporting", "tracing"}),
    ("HTTP transport", {"http"}),
    (
        "composition root and process",
        {"server", "connections", "sockets", "handoff", "supervisor", "main", "cli", "listing"},
    ),
]
LAYER_OF = {top: index for index, (_, tops) in enumerate(LAYERS) for top in tops}


def top_of(path: Path) -> str:
    """The top-level name inside the package that `path` belongs to (a module or a subpackage)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_tops(path: Path) -> set[str]:
    """The package's top-level names that the module at `path` imports (relatively)."""
    here = path.relative_to(PACKAGE).parts[:-1]
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = here[: len(here) - (node.level - 1)]
            parts = [*base, *(node.module.split(".") if node.module else [])]
            if parts:
                tops.add(parts[0])
            else:  # `from . import x` at the top of the package
                tops.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            assert not any(n and n.startswith("order_pipeline") for n in names), path
    return tops


def modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if top_of(p) not in ("__init__", "__main__")]


def test_every_module_has_a_layer() -> None:
    """Each module and subpackage of the package is placed in exactly one layer."""
    assert {top_of(p) for p in modules()} == set(LAYER_OF)


def test_each_layer_imports_only_inward() -> None:
    """No module imports a layer outside its own: the rule the architecture document states."""
    outward = [
        (top_of(path), top)
        for path in modules()
        for top in imported_tops(path)
        if top != top_of(path) and LAYER_OF[top] > LAYER_OF[top_of(path)]
    ]

    assert outward == []


def test_the_orchestrator_knows_no_service_and_no_store() -> None:
    """The orchestrator imports the model alone: steps are injected, outcomes reported."""
    assert imported_tops(PACKAGE / "orchestrator.py") <= LAYERS[0][1]


def test_the_store_process_imports_no_outer_layer() -> None:
    """A store process imports the store and the model, not the web framework or the server
    (the package's names are imported when first used): it starts in half the time and
    memory (docs/architecture.md)."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, order_pipeline.store.process; print(*sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip # the command on one line, as it would be typed

    assert "order_pipeline.store.process" in loaded
    assert {"quart", "hypercorn", "order_pipeline.server", "order_pipeline.desk"}.isdisjoint(loaded)
