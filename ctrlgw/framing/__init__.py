"""
Framings: how a listener cuts a connection's byte stream into frames.

A framing is chosen per listener with C{framing = NAME}.  The built-ins are
C{lines}, C{int32} and C{netstring}; more can be installed as Twisted
plugins providing L{IFramingFactory}.  See C{docs/framing.md}.
"""

from __future__ import annotations

from ._int32 import int32Framing
from ._interface import FramingError, FramingOptionError, IFraming, IFramingFactory
from ._lines import linesFraming
from ._lookup import availableFramings, findFraming
from ._netstring import netstringFraming

__all__ = [
    "FramingError",
    "FramingOptionError",
    "IFraming",
    "IFramingFactory",
    "availableFramings",
    "findFraming",
    "int32Framing",
    "linesFraming",
    "netstringFraming",
]
