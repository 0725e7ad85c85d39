"""
C{twistd ctrlgw}: command-line options and the service maker.

This is the edge: the only module that imports the global reactor, and only inside
L{makeService}.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from ctrlgw.config import ConfigError, GatewayConfig, Overrides, loadConfig


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a ctrlgw controller gateway.  Settings come from the ini file (see "
        "etc/ctrlgw.ini for every key); the options below override it."
    )
    optParameters = [
        ["config", "c", "etc/ctrlgw.ini", "The ini file to read."],
        ["instance-id", None, None, "This instance's id ([gateway] instance_id)."],
        ["http", None, None, "Endpoint of the HTTP listener ([http] endpoint)."],
        ["dsn", None, None, "PostgreSQL DSN ([database] dsn); empty runs the embedded server."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.gatewayConfig: GatewayConfig | None = None

    def opt_listen(self, value: str) -> None:
        """
        Endpoint of a controller listener, e.g. tcp:7000 ([listener:NAME] endpoint); give
        NAME=ENDPOINT when several listeners are configured.  May be repeated.
        """
        self["listen"].append(value)

    opt_l = opt_listen

    def postOptions(self) -> None:
        overrides = Overrides(
            listen=tuple(self["listen"]),
            instance_id=self["instance-id"],
            http=self["http"],
            dsn=self["dsn"],
        )
        try:
            self.gatewayConfig = loadConfig(self["config"], overrides)
        except ConfigError as e:
            # One line naming file, section and key; a traceback would bury it.
            sys.stderr.write(f"ctrlgw: {e}\n")
            raise SystemExit(2) from None


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    from ctrlgw.service import Gateway

    assert options.gatewayConfig is not None
    return Gateway(
        options.gatewayConfig, reactor, lambda line: stopProcess(reactor, line),
        exit=lambda: _stopReactor(reactor),
    ).service


def _stopReactor(reactor: Any) -> None:
    """
    Stop: the service tree stops in order, then the process exits with status 0.
    """
    from twisted.internet.error import ReactorNotRunning

    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # Stopping already.


def _exitNow(status: int) -> None:
    for stream in (sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(status)


def stopProcess(reactor: Any, line: str) -> None:
    """
    Say C{line} on standard error and stop: the service tree stops in order, then the
    process exits with status 1.

    twistd has no exit status to set, so the status is set as the interpreter exits,
    after twistd has stopped the reactor and removed its pid file.
    """
    from twisted.internet.error import ReactorNotRunning

    from ctrlgw.service import writeToStderr

    writeToStderr(line)
    atexit.register(_exitNow, 1)
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass  # Stopping already.
