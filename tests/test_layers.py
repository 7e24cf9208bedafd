"""The package's shape holds: no import circles, no import running back up a layer, the derivation tooling and
transformers internals where they belong. Read from the source (every import statement, also those inside
functions), so a new module is checked as soon as it exists."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moeslim"

#: Lowest first; a module may import its own layer and those below it. The longest matching prefix wins.
LAYERS: list[tuple[str, ...]] = [
    ("moeslim", "moeslim.errors", "moeslim.jsonio", "moeslim.units", "moeslim.safefs", "moeslim.names"),
    ("moeslim.shards", "moeslim.floats", "moeslim.source", "moeslim.families.table", "moeslim.families.runtime",
     "moeslim.quant", "moeslim.layout", "moeslim.plan",
     "moeslim.targets", "moeslim.hub", "moeslim.calibrate.statistics", "moeslim.stream.options", "moeslim.remote"),
    ("moeslim.stream", "moeslim.surgery", "moeslim.families", "moeslim.tensorfile"),
    ("moeslim.calibrate", "moeslim.correct.fit", "moeslim.criteria", "moeslim.remote.retain"),
    ("moeslim.correct", "moeslim.validate", "moeslim.inspection", "moeslim.publish", "moeslim.remote.repo"),
    ("moeslim.pipeline",),
    ("moeslim.cli", "moeslim.__main__"),
]  # fmt: skip
DERIVATION = ("moeslim.families.derive", "moeslim.families.tiny")  # run by tests and by hand, and at run time only:
#: The one run-time import of the derivation. A model type the committed table lacks, or one it may describe stale
#: (the installed transformers is not the one it was derived under), is derived when a command meets it, before any
#: weight is read; ``runtime.py`` imports ``derive`` inside the function that derives, so a run on a committed family
#: never imports it (``test_the_one_runtime_import_of_the_derivation_is_inside_a_function``, and
#: ``tests/test_startup.py`` on real commands). The edge runs up a layer (the table's layer to the derivation's) and
#: closes a circle through the table; it is the one exception to both rules.
LAZY_DERIVATION = ("moeslim.families.runtime", "moeslim.families.derive")
TRANSFORMERS_INTERNALS = ("transformers.conversion_mapping", "transformers.core_model_loading",
                          "transformers.modeling_utils", "transformers.models")  # fmt: skip


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every module named by an import in ``path`` (``from a import b`` gives ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _layer(module: str) -> int:
    best = max(
        ((len(prefix), i) for i, layer in enumerate(LAYERS) for prefix in layer
         if module == prefix or module.startswith(prefix + ".")),
        default=None,
    )  # fmt: skip
    assert best is not None, f"{module} is in no layer of LAYERS: add it"
    return best[1]


def _graph() -> dict[str, set[str]]:
    """Module → the package modules it imports, less the one lazy import of the derivation (``LAZY_DERIVATION``)."""
    return {
        m: {t for t in _imports(p) if t in MODULES and t not in (m, "moeslim") and (m, t) != LAZY_DERIVATION}
        for m, p in MODULES.items()
    }


def test_no_import_runs_back_up_a_layer() -> None:
    up = sorted(
        f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
        for m, targets in _graph().items()
        for t in targets
        if _layer(t) > _layer(m)
    )
    assert not up, "\n".join(up)


def test_no_import_circles() -> None:
    graph = _graph()
    reach: dict[str, set[str]] = {}

    def reachable(m: str) -> set[str]:
        if m not in reach:
            reach[m] = set()
            seen, todo = set(), list(graph[m])
            while todo:
                t = todo.pop()
                if t not in seen:
                    seen.add(t)
                    todo.extend(graph[t])
            reach[m] = seen
        return reach[m]

    circles = sorted(m for m in graph if m in reachable(m))
    assert not circles, f"modules on an import circle: {circles}"


def test_the_derivation_tooling_is_off_the_runtime_import_path() -> None:
    users = sorted(
        f"{m}: {t}" for m, p in MODULES.items() if m not in DERIVATION for t in _imports(p) & set(DERIVATION)
        if (m, t) != LAZY_DERIVATION
    )  # fmt: skip
    assert not users, f"runtime modules importing the derivation tooling: {users}"


def test_the_one_runtime_import_of_the_derivation_is_inside_a_function() -> None:
    """``runtime.py`` imports the derivation only in the function that derives, never when it is imported."""
    user, derivation = LAZY_DERIVATION
    tree = ast.parse(MODULES[user].read_text(encoding="utf-8"))
    at_top = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names
    }  # fmt: skip
    at_top |= {f"{n.module}.{a.name}" for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert derivation not in at_top
    assert derivation in _imports(MODULES[user])  # the exception is still needed: drop it when it is not


def test_transformers_internals_only_in_the_engine() -> None:
    outside = sorted(
        f"{m}: {t}"
        for m, p in MODULES.items()
        if not m.startswith(("moeslim.stream", "moeslim.families"))
        for t in _imports(p)
        if t.startswith(TRANSFORMERS_INTERNALS)
    )
    assert not outside, f"transformers internals imported outside moeslim/stream and moeslim/families: {outside}"


def test_the_checks_can_fail() -> None:
    """The layer rule and the circle search see what they must: a low module importing a high one."""
    assert _layer("moeslim.stream.loop") < _layer("moeslim.calibrate.collect") < _layer("moeslim.pipeline")
    assert "moeslim.stream.loop" in _imports(MODULES["moeslim.calibrate.collect"])
