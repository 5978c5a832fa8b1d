"""The package layout keeps its promises (docs/architecture.md): no import cycles, family questions answered by the
family registry only, short documented modules, and the old import paths still working."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import sparsedit
from sparsedit.families import families, family_class, family_of
from sparsedit.families.presets import preset_config

SRC = Path(sparsedit.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every sparsedit module ``path`` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sparsedit"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sparsedit"))
    return {m for m in found if m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_even_through_imports_inside_functions() -> None:
    graph = {name: _imports(path) - {name} for name, path in MODULES.items()}
    assert _cycles(graph) == []


# Which top-level parts of the package may import which (docs/architecture.md, "The picture").
LOWER = {"errors", "_version", "_moved"}
ALLOWED = {
    "core": LOWER,
    "encoders": LOWER,
    "diffusion": LOWER | {"core", "encoders"},
    "families": LOWER | {"core", "encoders", "diffusion"},
    "loading": LOWER | {"core", "families"},
    "interop": LOWER | {"families"},
    "lora": LOWER | {"core", "families"},
    "train": LOWER | {"core", "encoders", "diffusion", "families", "loading"},
    "eval": LOWER | {"core", "encoders", "diffusion", "families", "loading", "train"},
}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_imports_only_point_down_the_layers() -> None:
    wrong = sorted(f"{name} imports {dep}" for name, path in MODULES.items() if _part(name) in ALLOWED
                   for dep in _imports(path) if _part(dep) not in ALLOWED[_part(name)] | {_part(name)})
    assert wrong == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _family_class_names() -> set[str]:
    names = set()
    for name, path in MODULES.items():
        if name.startswith("sparsedit.families."):
            names.update(n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef))
    return names


def _type_checks(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, class name) of every ``isinstance(x, C)`` / ``isinstance(x, (C, D))`` / ``type(x) is C``."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            arg = node.args[1]
            elts = arg.elts if isinstance(arg, ast.Tuple) else [arg]
            hits += [(node.lineno, e.id) for e in elts if isinstance(e, ast.Name)]
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and \
                getattr(node.left.func, "id", None) == "type":
            hits += [(node.lineno, c.id) for c in node.comparators if isinstance(c, ast.Name)]
    return hits


def test_no_module_outside_a_family_asks_which_family_a_model_is() -> None:
    family_classes = _family_class_names()
    assert {"DiT", "SparseDiTConfig", "PixArt", "LatteConfig", "SparseLatte"} <= family_classes
    offenders = [f"{name}:{line} isinstance(..., {cls})" for name, path in MODULES.items()
                 if not name.startswith("sparsedit.families")
                 for line, cls in _type_checks(ast.parse(path.read_text())) if cls in family_classes]
    assert offenders == []


def test_the_type_check_finder_sees_the_forms_it_looks_for() -> None:
    tree = ast.parse("isinstance(m, DiT)\nisinstance(c, (PixArtConfig, LatteConfig))\ntype(m) is SparseDiT\n")
    assert [c for _, c in _type_checks(tree)] == ["DiT", "PixArtConfig", "LatteConfig", "SparseDiT"]


def test_every_module_says_what_it_is_and_stays_short() -> None:
    problems = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        doc = ast.get_docstring(tree)
        if not doc:
            problems.append(f"{name}: no module docstring")
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and "over 500 lines because" not in " ".join(doc.split()):
            problems.append(f"{name}: {lines} lines and no reason in its docstring")
    assert problems == []


def test_every_model_type_belongs_to_exactly_one_registered_family() -> None:
    from sparsedit.core.checkpoint import model_types

    registered = families()
    assert [cls.name for cls in registered] == ["dit", "pixart", "latte", "sd3", "flux", "wan"]
    for model_type, (config_cls, model_cls) in model_types().items():
        owner = family_class(model_type)
        assert model_type in (owner.dense_type, owner.sparse_type)
        assert sum(model_type in (cls.dense_type, cls.sparse_type) for cls in registered) == 1
        assert owner.model_types()[model_type] == (config_cls, model_cls)


@pytest.mark.parametrize("preset, family, sparse", [("DiT-S/2", "dit", False), ("SparseDiT-XL/2", "dit", True),
                                                    ("PixArt-XL/2", "pixart", False),
                                                    ("SparsePixArt-XL/2", "pixart", True),
                                                    ("Latte-S/2", "latte", False), ("SparseLatte-XL/2", "latte", True),
                                                    ("Wan2.1-T2V-1.3B", "wan", False),
                                                    ("SD3.5-medium", "sd3", False), ("SparseSD3.5-large", "sd3", True),
                                                    ("FLUX.1-dev", "flux", False), ("SparseFLUX.1-dev", "flux", True)])
def test_family_of_answers_from_the_config_model_type(preset: str, family: str, sparse: bool) -> None:
    fam = family_of(preset_config(preset))
    assert (fam.name, fam.sparse) == (family, sparse)


def test_family_of_refuses_what_is_not_a_sparsedit_model() -> None:
    with pytest.raises(sparsedit.SparseditError, match="not a sparsedit model"):
        family_of(object())
    with pytest.raises(sparsedit.SparseditError, match="unknown model_type 'Unet'"):
        family_class("Unet")


@pytest.mark.parametrize("old, new, name", [("sparsedit.dit", "sparsedit.families.dit", "DiT"),
                                            ("sparsedit.sparse_dit", "sparsedit.core.layout", "LAYOUTS"),
                                            ("sparsedit.convert", "sparsedit.families.dit.convert", "official_state_dict"),
                                            ("sparsedit.latte", "sparsedit.families.latte", "generate_latte"),
                                            ("sparsedit.metrics.adm", "sparsedit.eval.metrics.adm", "evaluate"),
                                            ("sparsedit.commands.common", "sparsedit.cli.common", "Parser")])
def test_old_import_paths_still_work_and_say_where_the_module_went(old: str, new: str, name: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_importing_the_package_itself_warns_about_nothing() -> None:
    code = "import warnings; warnings.simplefilter('error'); import sparsedit, sparsedit.cli; sparsedit.cli.build_parser()"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_old_module_path_still_runs_with_python_m() -> None:
    out = subprocess.run([sys.executable, "-m", "sparsedit.commands.sample_fid", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--num-samples" in out
