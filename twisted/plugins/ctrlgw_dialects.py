"""
Declares ctrlgw's built-in dialects as Twisted plugins, so that they are listed by
C{getPlugins(IDialect)} alongside third-party ones.
"""

from __future__ import annotations

from ctrlgw.dialects import ocpp16Dialect, v1Dialect

__all__ = ["ocpp16Dialect", "v1Dialect"]
