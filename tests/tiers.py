"""
The test tiers of docs/testing.md, and which test classes are in each.

    .venv/bin/python -m tests.tiers logic          # the trial names of one tier
    make test TESTS="$(.venv/bin/python -m tests.tiers logic)"

A class is in the first tier that claims it:

  - C{privileged}: the fault-injection modules that need root, network namespaces or
    HAProxy (they skip without, or fail with C{CTRLGW_REQUIRE_PRIVILEGED=1});
  - C{processes}: classes whose code (or a base class's) starts C{twistd} or C{ctrlgw} as
    child processes;
  - C{logic}: L{SynchronousTestCase} classes: Clock and fakes, no reactor, no database;
  - C{reactor}: the rest, on the real reactor: loopback sockets, real PostgreSQL, gateways
    in the test's own process.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import sys
from collections.abc import Iterator
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

import tests

TIERS = ("logic", "reactor", "processes", "privileged")

PRIVILEGED_MODULES = frozenset({"tests.test_faults_network"})

# What a class's source says when it runs a child process.
PROCESS_MARKS = (
    "TwistdProcess", "TwistdGateway", "spawnProcess", "getProcessOutput", "subprocess.run",
    "subprocess.Popen", "subprocess.check_",
)


def testClasses() -> Iterator[type[SynchronousTestCase]]:
    """
    Every test class of the C{tests} package with at least one test, where it is defined.
    """
    for info in sorted(pkgutil.iter_modules(tests.__path__), key=lambda i: i.name):
        if not info.name.startswith("test_"):
            continue
        module = importlib.import_module(f"tests.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, SynchronousTestCase)
                and cls.__module__ == module.__name__
                and any(name.startswith("test") for name in dir(cls))
            ):
                yield cls


@functools.cache
def _classSources(moduleName: str) -> dict[str, str]:
    """
    The source of each top-level class of a module (parsed once: inspect.getsource parses
    the whole module again for every class).
    """
    text = Path(str(sys.modules[moduleName].__file__)).read_text(encoding="utf-8")
    return {
        node.name: ast.get_source_segment(text, node) or ""
        for node in ast.parse(text).body
        if isinstance(node, ast.ClassDef)
    }


def _ownSource(cls: type) -> str:
    return "\n".join(
        _classSources(base.__module__).get(base.__name__, "")
        for base in cls.__mro__
        if base.__module__.startswith("tests.")
    )


def tierOf(cls: type[SynchronousTestCase]) -> str:
    if cls.__module__ in PRIVILEGED_MODULES:
        return "privileged"
    if any(mark in _ownSource(cls) for mark in PROCESS_MARKS):
        return "processes"
    if not issubclass(cls, TestCase):
        return "logic"
    return "reactor"


def names(tier: str) -> list[str]:
    return [f"{cls.__module__}.{cls.__name__}" for cls in testClasses() if tierOf(cls) == tier]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in TIERS:
        sys.stderr.write(f"usage: python -m tests.tiers {{{','.join(TIERS)}}}\n")
        return 2
    sys.stdout.write(" ".join(names(argv[0])) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
