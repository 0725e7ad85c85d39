"""
Finding named plugins (framings, dialects): the built-ins plus any installed ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from twisted.plugin import getPlugins

T = TypeVar("T")


def pluginsByName(interface: Any, builtins: Iterable[T]) -> dict[str, T]:
    """
    Every plugin providing C{interface}, by its C{name}, looked up afresh (L{getPlugins}
    keeps its own C{dropin.cache}).  A plugin cannot take a built-in's name: the built-ins
    are part of the gateway's contract and must not change meaning because some package
    was installed.  Among plugins sharing a name, the first one found wins.
    """
    found: dict[str, T] = {}
    for plugin in getPlugins(interface):
        found.setdefault(plugin.name, plugin)
    found.update((builtin.name, builtin) for builtin in builtins)  # type: ignore[attr-defined]
    return found


def pluginNamed(plugins: dict[str, T], name: str, kind: str) -> T:
    """
    @raise KeyError: no plugin has that name; the message lists the known ones.
    """
    try:
        return plugins[name]
    except KeyError:
        known = ", ".join(sorted(plugins))
        raise KeyError(f"unknown {kind} {name!r}; known {kind}s: {known}") from None
