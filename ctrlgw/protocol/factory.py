"""
The factory of one listener: its framing, its name, the shared connection context.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import ServerFactory

from ctrlgw.framing import IFraming
from ctrlgw.protocol.connection import ConnectionContext, ControllerProtocol
from ctrlgw.protocol.sockopts import applyToTransport


class ControllerFactory(ServerFactory):
    def __init__(
        self,
        context: ConnectionContext,
        listener: str,
        makeFraming: Callable[[], IFraming],
        applySocketOptions: Callable[[Any], object] | None = None,
    ) -> None:
        self.context = context
        self.listener = listener
        self.makeFraming = makeFraming
        if applySocketOptions is None:

            def applySocketOptions(transport: Any) -> object:
                return applyToTransport(transport, context.liveness)

        self.applySocketOptions = applySocketOptions

    def buildProtocol(self, addr: IAddress | None) -> ControllerProtocol:
        protocol = ControllerProtocol(
            self.context, self.listener, self.makeFraming(), self.applySocketOptions
        )
        protocol.factory = self
        return protocol
