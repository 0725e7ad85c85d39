# -*- test-case-name: tests.test_ocpp -*-
"""
C{ctrlgw sim --dialect ocpp1.6}: simulated OCPP 1.6J charge points, for the fleet of
L{ctrlgw.sim}.  Each connects with the WebSocket upgrade to C{/ocpp/<id>} (sans-I/O
C{wsproto}, as the gateway's side), boots, and sends each C{msg} the pacer offers as a
C{MeterValues} CALL, acked by its CALLRESULT once stored.  The gateway's CALLs (commands)
are answered C{{"status": "Accepted"}} unless C{--no-ack}; WebSocket pings are answered.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from ctrlgw.clock import wallMillis
from ctrlgw.simtrackers import TrackerController

if TYPE_CHECKING:
    from ctrlgw.sim import Fleet

OCPP_PATH = "/ocpp/"


class ChargePointSim(TrackerController):
    def __init__(self, fleet: Fleet, controller: str) -> None:
        super().__init__(fleet, controller)
        self.ws = WSConnection(ConnectionType.CLIENT)

    def connectionMade(self) -> None:
        self.fleet.stats.connects += 1
        self._helloAt = self.now()
        self._write(self.ws.send(Request(
            host="gateway", target=OCPP_PATH + self.controller, subprotocols=["ocpp1.6"],
        )))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and data:
            self.transport.write(data)

    def encode(self, messageId: str) -> bytes:
        ts = wallMillis(self.fleet.reactor) + int(self.fleet.options.skew * 1000)
        stamp = datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds")
        call = [2, messageId, "MeterValues", {"connectorId": 1, "meterValue": [
            {"timestamp": stamp.replace("+00:00", "Z"),
             "sampledValue": [{"value": str(self.fleet._sequence)}]}]}]
        return self.ws.send(TextMessage(data=json.dumps(call, separators=(",", ":"))))

    def sendMsg(self, messageId: str, body: object) -> None:
        # A CALL's answer names its id: acks are matched by id, not by order.
        self._pending[messageId] = self.now()
        self._write(self.encode(messageId))
        self.fleet.stats.msgs += 1

    def dataReceived(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.welcomed()
            elif isinstance(event, RejectConnection):
                self.fleet.countError("refused")
            elif isinstance(event, TextMessage):
                self._message(event.data)
            elif isinstance(event, Ping):
                self._write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._write(self.ws.send(event.response()))
                if self.transport is not None:
                    self.transport.loseConnection()

    def _message(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            self.fleet.countError("bad_json")
            return
        if not isinstance(message, list) or len(message) < 3:
            return
        if message[0] == 3:
            sentAt = self._pending.pop(str(message[1]), None)
            if sentAt is not None:
                self.fleet.stats.acks += 1
                self.fleet.stats.ackMs.append((self.now() - sentAt) * 1000)
        elif message[0] == 4:
            self._pending.pop(str(message[1]), None)
            self.fleet.countError(str(message[2]))
        elif message[0] == 2:
            self.commandReceived()
            if self.fleet.options.ack:
                answer = [3, message[1], {"status": "Accepted"}]
                self._write(self.ws.send(TextMessage(data=json.dumps(answer))))
