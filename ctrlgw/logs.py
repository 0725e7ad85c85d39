"""
Log output for production: one JSON object per line on standard output.

    twistd -n --logger=ctrlgw.logs.jsonToStdout ctrlgw --config etc/ctrlgw.ini

Every event keeps its keyword fields (C{controller}, C{instance}, C{epoch}, ...) as JSON
keys, so a log pipeline can filter on them.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def jsonToStdout() -> ILogObserver:
    """
    A log observer factory for twistd's C{--logger}.
    """
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
