"""
Declares ctrlgw's built-in framings as Twisted plugins, so that they are
listed by C{getPlugins(IFramingFactory)} alongside third-party ones.

This directory has no C{__init__.py} on purpose: Twisted's own
C{twisted.plugins} package adds every C{twisted/plugins} directory on
C{sys.path} to its C{__path__}, and an C{__init__.py} here would shadow it.
"""

from __future__ import annotations

from ctrlgw.framing import int32Framing, linesFraming, netstringFraming

__all__ = ["int32Framing", "linesFraming", "netstringFraming"]
