"""
The layout of the package: relay's modules import each other without
cycles (imports inside functions count), and each subpackage says what it
owns.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterator

from twisted.trial.unittest import SynchronousTestCase

import relay

PACKAGE = os.path.dirname(os.path.abspath(relay.__file__))


def modules() -> dict[str, str]:
    """
    Every module of relay, by dotted name, with its file.
    """
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported(module: str, path: str, known: dict[str, str]) -> Iterator[str]:
    """
    The relay modules that C{module} imports, anywhere in its file (in
    functions too; C{TYPE_CHECKING} blocks are left out: they never run).
    """
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    yield f"{source}.{alias.name}"
                elif source in known:
                    yield source


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {m for m in imported(name, path, known) if m != name}
        for name, path in known.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """
    One import cycle of C{graph} (a list of modules, the first repeated
    at the end), or C{None}.  A package importing its own submodules
    (C{relay} re-exporting the public API) is not a cycle unless the
    submodule imports the package back.
    """
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


class LayoutTests(SynchronousTestCase):
    """
    The shape of the package.
    """

    def test_no_import_cycles(self) -> None:
        """
        No relay module imports, directly or through others, one that
        imports it back, in functions or at the top.  (C{relay} itself,
        the plugin author's imports, is left out: its submodules import
        siblings, never the package.)
        """
        graph = import_graph()
        graph.pop("relay", None)
        for targets in graph.values():
            targets.discard("relay")
        self.assertIsNone(find_cycle(graph))

    def test_cycle_finder(self) -> None:
        """
        The check above finds a cycle when there is one.
        """
        self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}), ["a", "b", "c", "a"])
        self.assertIsNone(find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}))

    def test_subpackages_say_what_they_own(self) -> None:
        """
        Every subpackage has a module docstring.
        """
        for name, path in modules().items():
            if path.endswith("__init__.py"):
                with open(path) as f:
                    self.assertTrue(ast.get_docstring(ast.parse(f.read())), name)
