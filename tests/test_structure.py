"""The code's structure: no import circles (lazy imports included), layers depend only downwards,
every recipe field documented, and the generated recipe reference equal to the code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

# Lowest first. A module may import from its own layer or a lower one; circles are checked apart.
# data_prep sits between train's lower layers (which it uses) and its upper ones (which use it).
LAYERS = [
    ("train.core",),
    ("train.models",),
    ("train.inference",),
    ("data_prep",),
    ("train.evaluation",),
    ("train.methods",),
    ("train.export",),
    ("train.serve",),
    ("train.demo", "train.cli", "train.__main__", "data_prep.__main__"),
]
SKIP = ("data_prep/samples", "data_prep/codeio_functions", "train/evaluation/lm_eval_tasks")


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("train", "data_prep"):
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if rel.startswith(SKIP):
                continue
            name = rel[:-3].replace("/", ".").removesuffix(".__init__")
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> our modules it imports, anywhere in the file (functions included)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and Path(modules[target]).stat().st_size > 0:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} is in no layer: add it to LAYERS"
    return level


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_a_circle_would_be_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_layers_depend_only_downwards():
    upward = [f"{m} -> {t}" for m, targets in import_graph().items() for t in targets if layer_of(t) > layer_of(m)]
    assert upward == []


def test_lazy_imports_count():
    """The graph sees imports inside functions, not only at the top of a file."""
    graph = import_graph()
    assert "train.inference.llama_cpp" in graph["train.inference.generate"]  # imported inside make_generator


def test_every_recipe_field_has_help():
    from train.core.config import Recipe
    from train.core.reference import describe

    missing = [row.key for row in describe(Recipe) if not row.help.strip()]
    assert missing == []


def test_recipe_reference_page_is_generated_from_the_code():
    from train.core.config import Recipe
    from train.core.reference import describe, format_markdown

    page = REPO / "docs" / "recipe-reference.md"
    assert page.read_text(encoding="utf-8") == format_markdown(describe(Recipe)), "run `make docs`"


def test_recipe_help_prints_one_section(capsys):
    from train.cli import main

    main(["recipe-help", "training"])
    out = capsys.readouterr().out
    assert "training.stop_at_step: int | null = null" in out and "model.dtype" not in out
    with pytest.raises(SystemExit):
        main(["recipe-help", "trainig"])
    assert "no section 'trainig'" in capsys.readouterr().err
