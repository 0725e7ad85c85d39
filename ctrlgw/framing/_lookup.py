# -*- test-case-name: tests.test_framing -*-
"""
Finding framings by name: the built-ins plus any installed plugins.
"""

from __future__ import annotations

from twisted.plugin import getPlugins

from ._int32 import int32Framing
from ._interface import IFramingFactory
from ._lines import linesFraming
from ._netstring import netstringFraming

_builtinFramings: tuple[IFramingFactory, ...] = (linesFraming, int32Framing, netstringFraming)


def availableFramings() -> dict[str, IFramingFactory]:
    """
    Every framing a listener can name, by name.

    Plugins are looked up afresh on every call (L{getPlugins} keeps its own
    C{dropin.cache}), so a framing installed while the process runs is
    found the next time.  A plugin that reuses a built-in's name does not
    replace the built-in: the built-ins are part of the gateway's contract
    and must not change meaning because some package was installed.  Among
    plugins sharing a name, the first one found wins.

    @return: A new mapping of framing name to factory.
    """
    framings: dict[str, IFramingFactory] = {}
    for plugin in getPlugins(IFramingFactory):
        framings.setdefault(plugin.name, plugin)
    framings.update((builtin.name, builtin) for builtin in _builtinFramings)
    return framings


def findFraming(name: str) -> IFramingFactory:
    """
    Look up one framing by the name a listener gives in C{framing = NAME}.

    @raise KeyError: If no framing has that name; the message lists the
        names that are known.
    """
    framings = availableFramings()
    try:
        return framings[name]
    except KeyError:
        known = ", ".join(sorted(framings))
        raise KeyError(f"unknown framing {name!r}; known framings: {known}") from None
