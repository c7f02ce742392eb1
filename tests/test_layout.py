"""The house by concern (issue 17), kept: bridge/ is read with ``ast`` and the
rules of its layout are checked, so that a module that grows too large, an
import that reaches up a floor or a room setup.cfg does not ship fails here
rather than in review (or in a non-editable install).

- No module over 600 lines, no class over 400.
- The run-time import graph of bridge (imports inside functions count;
  those under ``if TYPE_CHECKING:`` do not) has no cycle.
- ``protocols`` never imports ``bridge``.
- Each room imports only the rooms below it (LAYERS); the ground modules
  import no other part of bridge; nothing below the top imports the top.
- setup.cfg ships every package of bridge and the status page.
"""

from __future__ import annotations

import ast
import configparser
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400

#: Top-level modules any room may use; they import no other part of bridge.
GROUND = {"bridge.endpoints", "bridge.reactor"}
#: The top: the service tree, the configuration (its keys, its sources, its
#: preflight against the machine, a reload applying it to the running tree),
#: twistd's tap, the CLI. They may import any room; no room imports them.
TOP = {"bridge", "bridge.config", "bridge.config_sources", "bridge.preflight", "bridge.reload",
       "bridge.service", "bridge.tap", "bridge.cli"}
#: Each room and the rooms it may import (besides itself and the ground),
#: as its ``__init__`` docstring says. Lower rooms never import higher ones.
LAYERS: dict[str, set[str]] = {
    "bridge.sessions": set(),
    # Running under systemd (notify, the log's form): nothing of the bridge.
    "bridge.daemon": set(),
    "bridge.security": {"bridge.sessions"},
    "bridge.backends": {"bridge.sessions"},
    "bridge.state": {"bridge.sessions", "bridge.security"},
    "bridge.lifecycle": {"bridge.sessions", "bridge.security", "bridge.backends"},
    "bridge.rdp": {"bridge.sessions", "bridge.security", "bridge.backends", "bridge.lifecycle"},
    "bridge.otsapi": {"bridge.sessions", "bridge.security", "bridge.lifecycle"},
    "bridge.farm": {"bridge.sessions", "bridge.security", "bridge.state", "bridge.lifecycle",
                    "bridge.otsapi"},
    "bridge.watch": {"bridge.sessions", "bridge.security", "bridge.backends", "bridge.state",
                     "bridge.lifecycle", "bridge.rdp", "bridge.otsapi", "bridge.farm"},
}


# -- reading the tree -------------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


#: The packages of the tree (a relative import inside one is relative to it).
PACKAGES = {module_name(path) for top in ("bridge", "protocols")
            for path in (ROOT / top).rglob("__init__.py")}


def modules(package: str) -> dict[str, str]:
    """Every module of ``package`` (a top-level directory): name -> source."""
    return {module_name(path): path.read_text()
            for path in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _run_time_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` but what sits under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for other in node.orelse:
                yield other
                yield from _run_time_nodes(other)
            continue
        yield node
        yield from _run_time_nodes(node)


def imports(name: str, source: str, known: Iterable[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports at run time.
    ``from P import M`` names module P.M when that is a module, else P."""
    known = set(known)
    package = name if name in PACKAGES else name.rpartition(".")[0]
    found = set()
    for node in _run_time_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    return {name: imports(name, source, sources) for name, source in sources.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle found (one per strongly connected part), as a path."""
    found, state, stack = [], dict.fromkeys(graph, 0), []

    def visit(node: str) -> None:
        state[node], _ = 1, stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                loop = stack[stack.index(target):]
                first = loop.index(min(loop))
                loop = loop[first:] + loop[:first]
                found.append([*loop, loop[0]])
            elif state.get(target) == 0:
                visit(target)
        state[node], _ = 2, stack.pop()

    for node in sorted(graph):
        if state[node] == 0:
            visit(node)
    return found


def room_of(name: str) -> str:
    """The room (or ground or top module) a module of bridge belongs to."""
    if name in GROUND or name in TOP:
        return name
    return ".".join(name.split(".")[:2])


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the house's rules, worded for a reader."""
    wrong = []
    for name, targets in sorted(graph.items()):
        room = room_of(name)
        for target in sorted(targets):
            other = room_of(target)
            if other == room or room in TOP:
                continue  # within a room; the top may import any room
            if room in GROUND:
                wrong.append(f"{name} imports {target}: the ground imports no other part")
            elif other in GROUND:
                continue
            elif other in TOP:
                wrong.append(f"{name} imports {target}: nothing below the top imports it")
            elif room not in LAYERS:
                wrong.append(f"{name}: room {room} is not in LAYERS (say what it may import)")
            elif other not in LAYERS[room]:
                wrong.append(f"{name} imports {target}: {room} may not import {other}")
    return wrong


# -- the rules --------------------------------------------------------------------------

def test_no_module_over_600_lines_and_no_class_over_400() -> None:
    too_long = []
    for name, source in modules("bridge").items():
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    too_long.append(f"class {name}.{node.name}: {length} lines")
    assert too_long == []


def test_the_run_time_import_graph_has_no_cycle() -> None:
    graph = import_graph(modules("bridge"))
    assert graph["bridge.service"], "the graph is read (the service imports rooms)"
    assert cycles(graph) == []


def test_protocols_never_imports_bridge() -> None:
    """Not even for types, nor inside a function."""
    offenders = {}
    for name, source in modules("protocols").items():
        named = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                named.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                named.add(node.module)
        if any(target.split(".")[0] == "bridge" for target in named):
            offenders[name] = sorted(named)
    assert offenders == {}


def test_rooms_import_only_rooms_below_them() -> None:
    graph = import_graph(modules("bridge"))
    assert layering_violations(graph) == []


def test_every_room_is_declared_and_the_declaration_is_layered() -> None:
    packages = {module_name(path.parent) for path in (ROOT / "bridge").glob("*/__init__.py")}
    assert packages - TOP == set(LAYERS), "a new room says in LAYERS what it may import"
    declared = {room: set(allowed) for room, allowed in LAYERS.items()}
    assert cycles(declared) == [], "rooms form floors: none may (indirectly) import itself"
    for room, allowed in LAYERS.items():
        assert allowed <= set(LAYERS), room
        doc = ast.get_docstring(ast.parse((ROOT / room.replace(".", "/") / "__init__.py")
                                          .read_text())) or ""
        assert "May import" in doc, f"{room}/__init__.py says what it may import"
        for other in allowed:
            assert f"``{other}``" in doc, f"{room}/__init__.py names {other}"


def test_the_checks_catch_what_they_are_for() -> None:
    """The rules above fail on a tree that breaks them (made up here)."""
    made_up = {
        "bridge.state.store": "from bridge.watch import admin\n",
        "bridge.watch.admin": "from bridge.state.store import StateStore\n",
        "bridge.sessions.model": "def f():\n    from bridge.service import BridgeService\n",
        "bridge.endpoints": "from bridge.sessions.model import Session\n",
        "bridge.service": "import bridge.watch.admin\n",
        "bridge.lifecycle.logon": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                   "    from bridge.rdp.link import RdpServerLink\n"),
    }
    graph = import_graph(made_up)
    assert graph["bridge.service"] == {"bridge.watch.admin"}
    assert graph["bridge.lifecycle.logon"] == set(), "type-only imports are not run-time ones"
    assert graph["bridge.sessions.model"] == {"bridge.service"}, "function-level imports count"
    assert cycles(graph) == [["bridge.state.store", "bridge.watch.admin", "bridge.state.store"]]
    assert layering_violations(graph) == [
        "bridge.endpoints imports bridge.sessions.model: the ground imports no other part",
        "bridge.sessions.model imports bridge.service: nothing below the top imports it",
        "bridge.state.store imports bridge.watch.admin: bridge.state may not import "
        "bridge.watch",
    ]


def test_setup_cfg_ships_every_package_of_bridge_and_its_data() -> None:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    packages = {module_name(path.parent) for path in (ROOT / "bridge").rglob("__init__.py")}
    assert packages - listed == set(), "a non-editable install would miss these"
    data = {package: {name.strip() for name in files.split(",")}
            for package, files in setup["options.package_data"].items()}
    for path in (ROOT / "bridge").rglob("*"):
        if path.is_file() and path.suffix not in (".py", ".pyc") \
                and "__pycache__" not in path.parts:
            package = module_name(path.parent / "__init__.py")
            assert path.name in data.get(package, set()), f"{path} is package data"


def test_the_stand_in_backend_keeps_the_name_ogon_check_looks_up() -> None:
    """ogon-check's ogon/run.sh installs the file of ``bridge.standin_backend``
    and runs it with the system's python3 as a module command: that name
    stays, as the very program bridge/backends/standin.py is, standalone."""
    import bridge.backends.standin as standin
    import bridge.standin_backend as by_old_name

    assert Path(by_old_name.__file__).read_bytes() == Path(standin.__file__).read_bytes()
    tree = ast.parse(Path(standin.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not {name for name in imported if name.split(".")[0] in ("bridge", "protocols")}
