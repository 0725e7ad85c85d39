"""
A charge point that no one here wrote: the C{ocpp} package's C{ChargePoint} over the
C{websockets} library, run as its own process by C{tests.test_ocpp}.

It connects to the URL given, boots, sends a heartbeat, a status notification, meter
values and an C{Authorize}, printing every answer as one JSON line on standard output,
then stays connected: it answers C{Reset} with C{Accepted} and C{UnlockConnector} with a
CALLERROR C{NotSupported}, prints each request it gets, and prints how its socket closed.
It ends when its standard input closes or its connection does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

import websockets
from ocpp.exceptions import NotSupportedError
from ocpp.routing import on
from ocpp.v16 import ChargePoint, call, call_result
from ocpp.v16.enums import Action, RegistrationStatus


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


class TestChargePoint(ChargePoint):  # type: ignore[misc]
    @on(Action.reset)
    async def onReset(self, type: str) -> call_result.Reset:
        say("request", action="Reset", payload={"type": type})
        return call_result.Reset(status="Accepted")

    @on(Action.unlock_connector)
    async def onUnlock(self, connector_id: int) -> call_result.UnlockConnector:
        say("request", action="UnlockConnector", payload={"connectorId": connector_id})
        raise NotSupportedError(description="this charge point has no connector lock")


async def scenario(cp: TestChargePoint, idTag: str) -> None:
    boot = await cp.call(call.BootNotification(
        charge_point_model="Test-1", charge_point_vendor="ctrlgw-tests"))
    say("boot", status=boot.status, interval=boot.interval, current_time=boot.current_time)
    assert boot.status == RegistrationStatus.accepted
    beat = await cp.call(call.Heartbeat())
    say("heartbeat", current_time=beat.current_time)
    await cp.call(call.StatusNotification(
        connector_id=1, error_code="NoError", status="Available"))
    say("status_notification")
    now = datetime.now(UTC).isoformat()
    await cp.call(call.MeterValues(connector_id=1, meter_value=[{
        "timestamp": now,
        "sampledValue": [{"value": "1234.5", "measurand": "Energy.Active.Import.Register"}],
    }]))
    say("meter_values")
    authorize = await cp.call(call.Authorize(id_tag=idTag))
    say("authorize", id_tag_info=authorize.id_tag_info)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--id-tag", default="TAG-1")
    parser.add_argument("--quiet", action="store_true", help="connect, then only answer")
    args = parser.parse_args()
    try:
        ws = await websockets.connect(args.url, subprotocols=["ocpp1.6"])
    except websockets.exceptions.InvalidStatus as e:
        say("refused", status=e.response.status_code)
        return
    say("connected", subprotocol=ws.subprotocol)
    cp = TestChargePoint(args.url.rsplit("/", 1)[-1], ws, response_timeout=20)
    running = asyncio.ensure_future(cp.start())
    if not args.quiet:
        # A takeover may end the connection while a request still waits for its answer.
        scripted = asyncio.ensure_future(scenario(cp, args.id_tag))
        await asyncio.wait([running, scripted], return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            scripted.cancel()
            say("closed", code=ws.close_code, reason=ws.close_reason)
            return
        scripted.result()
    say("ready")
    loop = asyncio.get_running_loop()
    stdinClosed = loop.run_in_executor(None, sys.stdin.read)
    done, _ = await asyncio.wait([running, stdinClosed], return_when=asyncio.FIRST_COMPLETED)
    if running in done:
        say("closed", code=ws.close_code, reason=ws.close_reason)
    else:
        await ws.close()
        say("left")


if __name__ == "__main__":
    asyncio.run(main())
