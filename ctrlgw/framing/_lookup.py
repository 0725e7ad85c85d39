# -*- test-case-name: tests.test_framing -*-
"""
Finding framings by name: the built-ins plus any installed plugins.
"""

from __future__ import annotations

from ctrlgw.plugins import pluginNamed, pluginsByName

from ._int32 import int32Framing
from ._interface import IFramingFactory
from ._lines import linesFraming
from ._netstring import netstringFraming

_builtinFramings: tuple[IFramingFactory, ...] = (linesFraming, int32Framing, netstringFraming)


def availableFramings() -> dict[str, IFramingFactory]:
    """
    Every framing a listener can name, by name: the built-ins and installed plugins
    (L{ctrlgw.plugins.pluginsByName}).

    @return: A new mapping of framing name to factory.
    """
    return pluginsByName(IFramingFactory, _builtinFramings)


def findFraming(name: str) -> IFramingFactory:
    """
    Look up one framing by the name a listener gives in C{framing = NAME}.

    @raise KeyError: If no framing has that name; the message lists the
        names that are known.
    """
    return pluginNamed(availableFramings(), name, "framing")
