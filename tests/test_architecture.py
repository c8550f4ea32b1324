"""rotfn's rooms and what each may import: the import graph parsed from the source (ast), every import counted.

The layers are those of ``docs/concepts/architecture.md``: a module may import its own room and rooms of
lower layers only, so arrows point down and no cycle can form; the lowest layer imports nothing of rotfn
but :mod:`rotfn.errors`; and no module imports a private (``_``-named) module of another package (a
private module serves its own package and that package's subpackages).
Imports inside functions count: a lazy import that dodges a cycle is still a cycle.
"""

import ast
import collections
import pathlib
import re

import pytest

import rotfn

ROOT = pathlib.Path(rotfn.__file__).parent

#: Rooms by layer, lowest first. A room is a subpackage (``rotfn/io/``) or a top-level module (``rotfn/cli.py``).
LAYERS = (
    ("errors", "_table", "_progress", "_command"),
    ("specs", "distributed"),
    ("ops", "metrics"),
    ("kernels", "cpu"),
    ("dispatch",),
    ("functional",),
    ("transforms",),
    ("plans",),
    ("model",),
    ("io", "learn"),
    ("calibration",),
    ("_report",),
    ("testing",),
    ("rotfn",),
    ("_demo",),
    ("cli",),
    ("__main__",),
)
LAYER = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    """``rotfn.io._hf`` -> ``io``; ``rotfn.cli`` -> ``cli``; ``rotfn`` (the public surface) -> ``rotfn``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rotfn"


def _package(module: str, is_package: bool) -> str:
    """The package a module belongs to: ``rotfn.io._hf`` -> ``rotfn.io``; ``rotfn.cli`` -> ``rotfn``."""
    return module if is_package else module.rpartition(".")[0]


def _imports(path: pathlib.Path):
    """``(line, imported module)`` of every absolute rotfn import in the file, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "rotfn")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "rotfn":
            for a in node.names:  # `from rotfn.x import y`: y may be a module of package x
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT.parent / sub.replace(".", "/")).is_dir() or (
                    ROOT.parent / (sub.replace(".", "/") + ".py")).is_file()
                yield node.lineno, sub if is_module else node.module


def _graph():
    files = sorted(ROOT.rglob("*.py"))
    assert files, ROOT
    for path in files:
        module = _module_name(path)
        for line, target in _imports(path):
            yield f"{path.relative_to(ROOT.parent)}:{line}", module, path.name == "__init__.py", target


EDGES = sorted(set(_graph()))


def test_every_room_has_a_layer():
    rooms = {_room(m) for _, m, _, _ in EDGES} | {_room(t) for *_, t in EDGES}
    assert not rooms - set(LAYER), f"rooms missing from LAYERS: {sorted(rooms - set(LAYER))}"


def test_imports_point_down_the_layers():
    up = [f"{at}: {_room(m)} (layer {LAYER[_room(m)]}) imports {t} (layer {LAYER[_room(t)]})"
          for at, m, _, t in EDGES if _room(t) != _room(m) and LAYER[_room(t)] >= LAYER[_room(m)]]
    assert not up, "imports that do not point down:\n" + "\n".join(up)


def test_the_lowest_layer_imports_only_errors():
    bad = [f"{at}: {t}" for at, m, _, t in EDGES if _room(m) in ("errors", "specs")
           and _room(t) not in (_room(m), "errors")]
    assert not bad, bad


def test_no_cycles_between_rooms():
    graph = collections.defaultdict(set)
    for _, m, _, t in EDGES:
        if _room(t) != _room(m):
            graph[_room(m)].add(_room(t))
    state: dict[str, int] = {}

    def visit(room, path):
        state[room] = 1
        for nxt in sorted(graph[room]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path, room, nxt]))
            if nxt not in state:
                visit(nxt, [*path, room])
        state[room] = 2

    for room in sorted(graph):
        if room not in state:
            visit(room, [])


def test_no_private_module_of_another_package_is_imported():
    bad = []
    for at, m, is_pkg, t in EDGES:
        own = _package(m, is_pkg)
        parts = t.split(".")
        for i in range(1, len(parts)):
            owner = ".".join(parts[:i])  # a private module belongs to its package and that package's subpackages
            if parts[i].startswith("_") and not (own == owner or own.startswith(owner + ".")):
                bad.append(f"{at}: {m} imports {t}")
                break
    assert not bad, "private modules imported across packages:\n" + "\n".join(bad)


def test_the_graph_is_not_empty():
    # the rules above hold vacuously on an empty graph: prove the parser sees real imports
    assert any(t == "rotfn.errors" for *_, t in EDGES) and len(EDGES) > 100


def test_dispatch_takes_every_reference_op_from_rotfn_ops():
    # rotfn.ops' __init__ is the one door to the reference math: dispatch reaches no ops module directly
    from rotfn import dispatch, ops

    assert dispatch._REFERENCE == {op: getattr(ops, op) for op in dispatch._REFERENCE}
    assert callable(ops.gptq)  # the function: no module of that name behind it
    assert not any(t.startswith("rotfn.ops.") for at, _, _, t in EDGES if at.startswith("rotfn/dispatch.py"))


def test_the_docs_table_is_this_tests_table():
    """docs/concepts/architecture.md lists the same rooms in the same layers as LAYERS."""
    doc = (ROOT.parent / "docs" / "concepts" / "architecture.md").read_text()
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", doc, flags=re.MULTILINE)
    table = [tuple(re.findall(r"`(\w+)`", re.sub(r"\(.*?\)", "", rooms))) for _, rooms in rows]
    assert [int(n) for n, _ in rows] == list(range(len(LAYERS)))
    assert table == list(LAYERS)
