"""The package's modules import each other without cycles.

The graph has one node per module of ``archext`` (a package is its ``__init__``) and an edge
A -> B when loading A runs B first. Only the imports that run while a module loads count: those
at module level, including inside module-level ``if``/``try``/``with`` blocks and class bodies.
Imports inside functions run when the function is called, after every module has loaded, so they
cannot make a load-time cycle and are left out; so are ``if TYPE_CHECKING:`` and
``if __name__ == "__main__":`` blocks, which do not run on import.

What an import statement in module M adds, strictly but without counting what cannot fail:

* ``import a.b.c`` and ``from a.b.c import name``: an edge to ``a.b.c``, and to each package on
  the way (``a``, ``a.b``), since importing a submodule runs its parents' ``__init__`` first,
  except the packages that contain M: those are already loading when M loads (M is imported
  through them), so naming them again runs nothing.
* ``from a.b import c`` where ``a.b.c`` is a module: an edge to ``a.b.c`` (Python falls back to
  importing the submodule when the partly loaded package lacks the attribute), plus the parents
  as above.
* ``from a.b import name`` where ``name`` is not a module: an edge to ``a.b`` itself, even when
  it contains M, because the name must already be defined by ``a/b/__init__.py``. So a package
  ``__init__`` that imports a submodule which takes a name back from the package is a cycle
  (it works only while ``__init__`` happens to define the name first), while a submodule that
  imports its sibling, through the package or relatively, is not.
"""
import ast
import pathlib
import textwrap
from typing import Optional

import archext

ROOT = pathlib.Path(archext.__file__).resolve().parent


def module_files(root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py file of the package under root and every built
    extension module (``_C.cpython-312-x86_64-linux-gnu.so``: a leaf, nothing to parse)."""
    mods = {}
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.so"), *root.rglob("*.pyd")]):
        rel = path.relative_to(root).parts
        rel = rel[:-1] + (rel[-1].split(".")[0],)
        if rel[-1] == "__init__":
            rel = rel[:-1]
        mods[".".join((package,) + rel)] = path
    return mods


def _load_time_nodes(body: list[ast.stmt]):
    """The import statements among `body` that run when the module loads."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _skipped_test(node.test):
            yield from _load_time_nodes(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, None) or []:
                    yield from _load_time_nodes([child] if isinstance(child, ast.stmt)
                                                else child.body)


def _every_import(tree: ast.Module):
    """Every import statement of the module, those inside functions included."""
    return (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))


def _skipped_test(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` (also `typing.TYPE_CHECKING`) or `if __name__ == "__main__":`."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def import_graph(root: pathlib.Path, package: str, *, load_time_only: bool = True) -> dict[str, set[str]]:
    mods = module_files(root, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        if path.suffix != ".py":
            continue
        is_pkg = path.name == "__init__.py"
        # The package relative imports resolve against, and the packages that contain mod.
        here = mod if is_pkg else mod.rpartition(".")[0]
        containing = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        if is_pkg:
            containing.add(mod)

        def add(target: str, *, explicit: bool) -> None:
            """Edges for loading `target` (with its parents); `explicit`: target's own namespace
            is read, so it counts even when it contains mod."""
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in mods or name == mod:
                    continue
                if name in containing and not (explicit and i == len(parts)):
                    continue
                graph[mod].add(name)

        tree = ast.parse(path.read_text(), filename=str(path))
        for node in (_load_time_nodes(tree.body) if load_time_only else _every_import(tree)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, explicit=False)
                continue
            if node.level:
                base_parts = here.split(".")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if alias.name != "*" and sub in mods:
                    add(sub, explicit=False)
                else:
                    add(source, explicit=True)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """A cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> Optional[list[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_archext_has_no_import_cycle():
    graph = import_graph(ROOT, "archext")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle at load time: " + " -> ".join(cycle)


def test_archext_has_no_import_cycle_in_function_imports_either():
    # Stricter than load time: a function-level import that closes a cycle cannot fail on
    # import, but it still ties two modules into one (cli <-> profile over a device helper,
    # config <-> blocks over BlockType were such pairs); the layout keeps none.
    cycle = find_cycle(import_graph(ROOT, "archext", load_time_only=False))
    assert cycle is None, "import cycle through function-level imports: " + " -> ".join(cycle)


def test_graph_sees_the_known_imports():
    # The walker finds real edges (a test that finds no edges would pass vacuously).
    graph = import_graph(ROOT, "archext")
    assert "archext.models.config" in graph["archext.models.blocks"]
    assert "archext.nn" in graph["archext.models.blocks"]
    assert "archext.ops" in graph["archext"]
    assert "archext._device" in graph["archext.cli"]
    assert "archext.bench.common" in graph["archext.bench.rope"]
    # Function-level imports are left out: the bench subcommands load lazily.
    assert not graph["archext.bench"] & {"archext.bench.rope", "archext.bench.loss"}


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_cycle_rules_on_small_packages(tmp_path):
    # A package __init__ importing its submodules, which import their siblings through the
    # package or relatively: no cycle.
    ok = tmp_path / "ok"
    _write(ok, {
        "__init__.py": "from . import a\nfrom .b import B\n",
        "a.py": "from ok import b\nimport ok.c\nfrom .c import C\n",
        "b.py": "import ok\nfrom .c import C\nB = 1\n",
        "c.py": "C = 1\ndef f():\n    from ok import a\n",
        "sub/__init__.py": "from .d import D\n",
        "sub/d.py": "from ..a import *\nD = 1\nif __name__ == '__main__':\n    import ok.sub\n",
        "_C.cpython-311-x86_64-linux-gnu.so": "",  # a built extension: a module, not a name
        "e.py": "from ok import _C\n",
    })
    graph = import_graph(ok, "ok")
    assert graph["ok"] == {"ok.a", "ok.b"}
    assert graph["ok.a"] == {"ok.b", "ok.c"}
    assert graph["ok.c"] == set()
    assert graph["ok.sub.d"] == {"ok.a"}
    assert graph["ok.e"] == {"ok._C"}
    assert find_cycle(graph) is None

    # Two modules importing each other at load time, and a submodule taking a name (not a
    # module) back from the package whose __init__ imports it: both cycles.
    bad = tmp_path / "bad"
    _write(bad, {
        "__init__.py": "from .a import A\nX = 1\n",
        "a.py": "from bad import X\nA = 1\n",
        "p.py": "try:\n    from .q import Q\nexcept ImportError:\n    pass\nP = 1\n",
        "q.py": "class K:\n    from bad.p import P\nQ = 1\n",
    })
    graph = import_graph(bad, "bad")
    assert find_cycle(graph) == ["bad", "bad.a", "bad"]
    del graph["bad"]
    assert find_cycle(graph) == ["bad.p", "bad.q", "bad.p"]
