"""
C{GET /v1/stream?group=NAME}: a consumer group as Server-Sent Events (docs/consuming.md).

Each entry is one event: C{id} is its C{entry_id}, C{event} its kind, C{data} the entry as
one line of JSON.  The connection is one consumer of the group: it reads a batch (leased
for C{[stream] lease}), writes it, waits until the connection has taken it (backpressure:
the transport's producer calls), and acks it.  A batch the connection could not take
(the client went away) is not acked, so the group hands it out again once the lease runs
out.  A client that reconnects with C{Last-Event-ID} first gets the retained entries after
that id that the group has already acked (what may have been lost in flight), then the
group's next entries.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from ctrlgw.api import STREAMING, ApiError, ApiResource, isoTime
from ctrlgw.client import Entry
from ctrlgw.config import StreamConfig
from ctrlgw.store.postgres import Store
from ctrlgw.stream import StreamReader

log = Logger()

# As check_stream_group and ack_stream validate them (migration 8).
GROUP = re.compile(r"[A-Za-z0-9._:-]{1,128}")
ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,19}")

# Entries per read (and per replay statement) of one SSE connection.
BATCH = 500


def entryJson(entry: Entry) -> dict[str, Any]:
    """
    An entry as SSE and C{ctrlgw tail --group} print it: the columns of C{read_stream},
    the time as RFC 3339.
    """
    return {
        "entry_id": entry.entry_id,
        "kind": entry.kind,
        "controller_id": entry.controller_id,
        "at": isoTime(entry.at),
        "body": entry.body,
    }


def sseEvent(entry: Entry) -> bytes:
    data = json.dumps(entryJson(entry), sort_keys=True, separators=(",", ":"))
    return f"id: {entry.entry_id}\nevent: {entry.kind}\ndata: {data}\n\n".encode()


@implementer(IPushProducer)
class _Flow:
    """
    The connection's producer: tells the loop when the transport's buffer is full, and
    when the client has gone.
    """

    def __init__(self, request: Request) -> None:
        self.gone = False
        self._resumed: Deferred[None] | None = None
        self.paused = False
        request.registerProducer(self, True)
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, _: object) -> None:
        self.gone = True
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._resumed = self._resumed, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self._finished(None)

    def drained(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if not self.paused or self.gone:
            d.callback(None)
        else:
            self._resumed = d
        return d


class StreamApi:
    """
    Adds C{GET /v1/stream} to the API.
    """

    def __init__(self, store: Store, reader: StreamReader, config: StreamConfig) -> None:
        self.store = store
        self.reader = reader
        self.config = config

    def install(self, api: ApiResource) -> None:
        api.addRoute(b"GET", 1, self.stream)

    async def stream(self, request: Request, collection: str) -> tuple[int, object] | None:
        if collection != "stream":
            return None
        args: dict[bytes, list[bytes]] = request.args or {}
        groups = args.get(b"group", [])
        group = groups[0].decode("utf-8", "replace") if len(groups) == 1 else ""
        if not GROUP.fullmatch(group):
            raise ApiError(400, "?group= must name one group: 1-128 of A-Z a-z 0-9 . _ : -")
        last = (request.getHeader(b"last-event-id") or b"").decode("ascii", "replace").strip()
        if last and not ENTRY_ID.fullmatch(last):
            raise ApiError(400, "Last-Event-ID is not an entry id")
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.write(b": ctrlgw stream " + group.encode() + b"\n\n")
        Deferred.fromCoroutine(self._serve(request, group, last))
        return STREAMING, None

    async def _serve(self, request: Request, group: str, last: str) -> None:
        flow = _Flow(request)
        try:
            while last and not flow.gone:
                missed = await self.store.replayStream(group, last, BATCH)
                if not missed:
                    break
                request.write(b"".join(sseEvent(e) for e in missed))
                last = missed[-1].entry_id
                await flow.drained()
            while not flow.gone:
                entries = await self.reader.read(
                    group, BATCH, self.config.lease, self.config.heartbeat
                )
                if flow.gone:
                    break  # not acked: handed out again after the lease
                if not entries:
                    request.write(b": idle\n\n")
                    continue
                request.write(b"".join(sseEvent(e) for e in entries))
                await flow.drained()
                if flow.gone:
                    break
                await self.store.ackStream(group, [e.entry_id for e in entries])
        except Exception as e:
            log.warn("stream for group {group} ended: {error}", group=group, error=e)
        finally:
            if not flow.gone:
                request.unregisterProducer()
                request.finish()
