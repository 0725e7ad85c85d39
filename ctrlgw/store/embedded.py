"""
A private PostgreSQL for development, from the C{pgserver} package.

Used when C{[database] dsn} is empty.  Starting it blocks for about a second, so it runs in
a thread, never on the reactor thread.
"""

from __future__ import annotations

import os
import warnings

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

log = Logger()


class EmbeddedUnavailable(Exception):
    """
    pgserver is not installed.
    """


def startEmbedded(reactor: IReactorThreads, dataDir: str) -> Deferred[str]:
    """
    Start (or join) the embedded server in C{dataDir}; fires with its DSN.
    """
    try:
        with warnings.catch_warnings():
            # platformdirs complains about XDG_RUNTIME_DIR on servers; it is harmless here.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import pgserver
    except ImportError:
        raise EmbeddedUnavailable(
            "[database] dsn is empty and the embedded PostgreSQL is not installed: "
            "pip install 'ctrlgw[embedded]' or set [database] dsn"
        ) from None
    path = os.path.abspath(dataDir)
    os.makedirs(path, exist_ok=True)

    def start() -> str:
        server = pgserver.get_server(path, cleanup_mode="stop")
        return str(server.get_uri())

    log.warn(
        "EMBEDDED PostgreSQL in {path}: for development only; set [database] dsn in production",
        path=path,
    )
    return deferToThreadPool(reactor, reactor.getThreadPool(), start)
