# -*- test-case-name: tests.test_dialects -*-
"""
Dialects: how a device's own protocol maps onto the gateway's session model.

A dialect says how a device identifies itself (the claim), what a message is (the inbox,
acked only after commit), how a command is written and its answer read (the outbox and
its settlements), how liveness is kept and how a connection is told to go.  Ownership,
fencing, takeover, the inbox and the outbox are the same for every dialect: a dialect's
connection is a L{ctrlgw.protocol.session.SessionProtocol}.

A listener chooses one with C{dialect = NAME} (default C{v1}).  The built-ins are C{v1},
C{ocpp1.6}, C{teltonika} and C{gt06}; more can be installed as Twisted plugins providing L{IDialect}.  See
C{docs/dialects.md}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Protocol
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface, implementer

from ctrlgw.config import Key, inRange, parseBool, parseDuration, parseNames, parseText
from ctrlgw.plugins import pluginNamed, pluginsByName

if TYPE_CHECKING:
    from ctrlgw.config import ListenerConfig
    from ctrlgw.dialects.telematics import TelematicsProtocol
    from ctrlgw.protocol.session import ConnectionContext


class IDialect(Interface):
    """
    A named dialect that a listener can select with C{dialect = NAME}.
    """

    name = Attribute("The name used in a listener's C{dialect = NAME}.")
    description = Attribute("One line for the documentation.")
    framing = Attribute(
        "The framing this dialect brings (a listener may leave C{framing} out or name "
        "exactly this one), or C{None}: the listener's C{framing} key chooses, default "
        "C{lines}."
    )
    keys = Attribute(
        "The listener keys of this dialect, as L{ctrlgw.config.Key}s; their parsed values "
        "are the listener's C{options}."
    )

    def check(options: Mapping[str, Any]) -> None:
        """
        Validate the dialect's options together.

        @raise ValueError: C{"KEY: reason"}.
        """

    def buildProtocol(
        context: ConnectionContext, listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object],
    ) -> Protocol:
        """
        One connection of a listener of this dialect: a L{SessionProtocol}.
        """

    def refuseConnection(
        context: ConnectionContext, listener: ListenerConfig, detail: str
    ) -> Protocol:
        """
        A connection past the listener's C{max_connections}: tell it, in the dialect's
        words, to retry later, and close.  It must hold no timer and read nothing.
        """


@implementer(IPlugin, IDialect)
class V1Dialect:
    name = "v1"
    description = "ctrlgw's own JSON frames (docs/protocol.md), over any framing"
    framing = None
    keys: tuple[Key, ...] = ()

    def check(self, options: Mapping[str, Any]) -> None:
        pass

    def buildProtocol(
        self, context: ConnectionContext, listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object],
    ) -> Protocol:
        from ctrlgw.protocol.connection import ControllerProtocol

        assert listener.makeFraming is not None
        return ControllerProtocol(
            context, listener.name, listener.makeFraming(), applySocketOptions,
            listener.timestampPolicy(context.timestamps),
        )

    def refuseConnection(
        self, context: ConnectionContext, listener: ListenerConfig, detail: str
    ) -> Protocol:
        from ctrlgw.protocol.factory import RefusedConnection

        assert listener.makeFraming is not None
        return RefusedConnection(context, listener.makeFraming(), detail)


# The requests only a backend can answer (an id tag's status, a transaction id).
OCPP_BACKEND_ACTIONS = ("Authorize", "StartTransaction", "StopTransaction", "DataTransfer")


@implementer(IPlugin, IDialect)
class Ocpp16Dialect:
    name = "ocpp1.6"
    description = "OCPP 1.6J charge points over WebSocket (docs/ocpp.md)"
    framing = "websocket"
    keys: tuple[Key, ...] = (
        Key("path", parseText, "/ocpp/"),
        Key("reply_timeout", inRange(parseDuration, 0.1, 3600), "30s"),
        Key("backend_actions", parseNames, ",".join(OCPP_BACKEND_ACTIONS)),
        Key("heartbeat_interval", inRange(parseDuration, 1, 86400), "300s"),
    )

    def check(self, options: Mapping[str, Any]) -> None:
        from ctrlgw.dialects.ocpp16 import CHARGE_POINT_ACTIONS

        path = options["path"]
        if not (path.startswith("/") and path.endswith("/")):
            raise ValueError(f"path: must start and end with '/', got {path!r}")
        actions = options["backend_actions"]
        for action in actions:
            if action not in CHARGE_POINT_ACTIONS:
                raise ValueError(
                    f"backend_actions: {action!r} is not a request a charge point sends"
                )
        for action in OCPP_BACKEND_ACTIONS:
            if action not in actions:
                raise ValueError(
                    f"backend_actions: must include {action}: only the backend can answer it"
                )

    def buildProtocol(
        self, context: ConnectionContext, listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object],
    ) -> Protocol:
        from ctrlgw.dialects.ocpp16 import OcppProtocol

        return OcppProtocol(context, listener, applySocketOptions)

    def refuseConnection(
        self, context: ConnectionContext, listener: ListenerConfig, detail: str
    ) -> Protocol:
        from ctrlgw.dialects.ocpp16 import RefusedUpgrade

        return RefusedUpgrade(detail)


@implementer(IPlugin, IDialect)
class TeltonikaDialect:
    name = "teltonika"
    description = "Teltonika trackers: Codec 8, 8 Extended and 12 over TCP (docs/dialects.md)"
    framing = "teltonika"
    keys: tuple[Key, ...] = ()

    def check(self, options: Mapping[str, Any]) -> None:
        pass

    def buildProtocol(
        self, context: ConnectionContext, listener: ListenerConfig,
        applySocketOptions: Callable[[Any], object],
    ) -> Protocol:
        return self.protocolClass()(context, listener, applySocketOptions)

    def protocolClass(self) -> type[TelematicsProtocol]:
        from ctrlgw.dialects.teltonika import TeltonikaProtocol

        return TeltonikaProtocol

    def refuseConnection(
        self, context: ConnectionContext, listener: ListenerConfig, detail: str
    ) -> Protocol:
        from ctrlgw.dialects.teltonika import RefusedTracker

        return RefusedTracker()


@implementer(IPlugin, IDialect)
class Gt06Dialect(TeltonikaDialect):
    name = "gt06"
    description = "Concox GT06 trackers over TCP (docs/dialects.md)"
    framing = "gt06"
    keys: tuple[Key, ...] = (Key("check_crc", parseBool, "yes"),)

    def protocolClass(self) -> type[TelematicsProtocol]:
        from ctrlgw.dialects.gt06 import Gt06Protocol

        return Gt06Protocol


v1Dialect = V1Dialect()
ocpp16Dialect = Ocpp16Dialect()
teltonikaDialect = TeltonikaDialect()
gt06Dialect = Gt06Dialect()


def builtinDialects() -> tuple[IDialect, ...]:
    return (v1Dialect, ocpp16Dialect, teltonikaDialect, gt06Dialect)


def availableDialects() -> dict[str, IDialect]:
    """
    Every dialect a listener can name, by name: the built-ins and installed plugins
    (L{ctrlgw.plugins.pluginsByName}).
    """
    return pluginsByName(IDialect, builtinDialects())


def findDialect(name: str) -> IDialect:
    """
    @raise KeyError: no dialect has that name; the message lists the known ones.
    """
    return pluginNamed(availableDialects(), name, "dialect")
