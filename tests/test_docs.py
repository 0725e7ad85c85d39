"""
The documentation against the code, driven from the docs' own text (their headings,
tables, code spans and examples): SQL functions, metrics, configuration keys, protocol
error codes, HTTP endpoints and statuses, presence objects, time formats and links.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ctrlgw import cli
from ctrlgw.api import ApiResource, isoTime, presenceJson
from ctrlgw.cluster import takeoverChannel
from ctrlgw.config import Key, sectionKeys
from ctrlgw.drain import drainChannel
from ctrlgw.interfaces import Unavailable
from ctrlgw.kick import Kicks, kickedChannel
from ctrlgw.metrics import Metrics
from ctrlgw.outbox import commandsChannel, resultsChannel
from ctrlgw.protocol import messages as v1
from ctrlgw.replies import repliesChannel
from ctrlgw.store.postgres import Store
from ctrlgw.stream import StreamDoorbell, StreamReader, streamChannel
from ctrlgw.web import MAX_REQUEST_BODY, Readiness, makeRoot, makeSite
from tests.docs import ROOT, Table, codeSpans, document, documents, jsonDocuments, jsonValues
from tests.helpers import iniText
from tests.pg import PostgresTestCase

# The schema the docs' examples use: the default of [database] schema.
[_SCHEMA_KEY] = [k for k in sectionKeys()["database"] if k.name == "schema"]
DOC_SCHEMA = _SCHEMA_KEY.default
CHANNELS = {
    f(DOC_SCHEMA)
    for f in (takeoverChannel, commandsChannel, resultsChannel, kickedChannel, drainChannel,
              repliesChannel, streamChannel)
}

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
LOOKS_LIKE_TIME = re.compile(r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d")


def allTables() -> list[Table]:
    return [t for d in documents() for t in d.tables()]


# --- the SQL API ---

_SIGNATURE = re.compile(
    rf"^{DOC_SCHEMA}\.(?P<name>\w+)\((?P<args>.*)\)\s*(?:→|->)\s*(?P<result>.+)$"
)
_CALL = re.compile(rf"(?<![\w.]){DOC_SCHEMA}\.(\w+)\s*\(")
_NAMED = re.compile(r"(\w+)\s*=>")
_FORM = re.compile(r"^(\w+)\((.*)\)$")


def splitArguments(text: str) -> list[str]:
    """
    Split an argument list on the commas outside quotes and parentheses.
    """
    parts, current, depth, quoted = [], "", 0, False
    for char in text:
        if char == "'":
            quoted = not quoted
        elif not quoted and char in "([":
            depth += 1
        elif not quoted and char in ")]":
            depth -= 1
        if char == "," and depth == 0 and not quoted:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _withoutDefault(argument: str) -> tuple[str, str | None]:
    head, sep, default = argument.partition(" DEFAULT ")
    return " ".join(head.split()), default.strip() if sep else None


class SqlApiTests(PostgresTestCase):
    """
    Every SQL function the docs name exists in a migrated schema, with the documented
    parameters, defaults and result.
    """

    async def functions(self) -> dict[str, list[dict[str, Any]]]:
        rows = await self.db.runQuery(
            "test_functions",
            "SELECT p.proname, pg_get_function_identity_arguments(p.oid),"
            " pg_get_function_arguments(p.oid), pg_get_function_result(p.oid),"
            " coalesce(p.proargnames, '{}'), coalesce(p.proargmodes::text[], '{}')"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = %s",
            (self.schema,),
        )
        found: dict[str, list[dict[str, Any]]] = {}
        for name, identity, arguments, result, names, modes in rows:
            inNames = [n for i, n in enumerate(names) if (modes[i] if modes else "i") in "ib"]
            found.setdefault(name, []).append(
                {"identity": identity, "arguments": arguments, "result": result, "in": inNames}
            )
        return found

    async def test_documentedSignatures(self) -> None:
        """
        A heading such as C{ctrlgw.send(controller text, ...) → uuid} states the
        function's parameters (names and types), their defaults and its result.
        """
        functions = await self.functions()
        checked = 0
        for doc in documents():
            for heading in doc.headings():
                for span in codeSpans(heading):
                    match = _SIGNATURE.match(span)
                    if match is None:
                        continue
                    checked += 1
                    await self.assertSignature(functions, doc.name, match)
        self.assertGreater(checked, 0, "no documented SQL signature found")

    async def assertSignature(
        self, functions: dict[str, list[dict[str, Any]]], where: str, match: re.Match[str]
    ) -> None:
        name, documented = match.group("name"), splitArguments(match.group("args"))
        overloads = functions.get(name, [])
        self.assertTrue(overloads, f"{where}: {DOC_SCHEMA}.{name}() does not exist")
        identity = ", ".join(_withoutDefault(a)[0] for a in documented)
        [actual] = [o for o in overloads if o["identity"] == identity] or [None]
        self.assertIsNotNone(
            actual,
            f"{where}: {name}({identity}) is documented; the schema has "
            + "; ".join(f"{name}({o['identity']})" for o in overloads),
        )
        self.assertEqual(
            actual["result"], match.group("result").strip(), f"{where}: {name} result"
        )
        real = [_withoutDefault(a) for a in splitArguments(actual["arguments"])]
        for (head, docDefault), (_, realDefault) in zip(
            (_withoutDefault(a) for a in documented), real, strict=True
        ):
            if docDefault is None or realDefault is None:
                self.assertEqual(
                    (docDefault, realDefault) == (None, None), True,
                    f"{where}: {name} {head}: documented default {docDefault!r}, real {realDefault!r}",
                )
                continue
            kind = head.split(None, 1)[1]
            rows = await self.db.runQuery(
                "test_default", f"SELECT ({docDefault})::{kind} = ({realDefault})::{kind}"
            )
            self.assertTrue(
                rows[0][0], f"{where}: {name} {head}: default {docDefault} is {realDefault}"
            )

    async def test_calledFunctionsExist(self) -> None:
        """
        Every C{ctrlgw.NAME(...)} call in a code span or an SQL block names a function of
        the schema, and its named arguments (C{name => value}) are parameters of it.
        """
        functions = await self.functions()
        checked = 0
        for doc in documents():
            texts = doc.spans() + [b.text for b in doc.blocks() if b.info in ("sql", "")]
            for text in texts:
                for call in _CALL.finditer(text):
                    name = call.group(1)
                    checked += 1
                    self.assertIn(name, functions, f"{doc.name}: {DOC_SCHEMA}.{name}()")
                    arguments = text[call.end() : _closing(text, call.end())]
                    params = {p for o in functions[name] for p in o["in"]}
                    for named in _NAMED.findall(arguments):
                        self.assertIn(named, params, f"{doc.name}: {name}({named} => ...)")
        self.assertGreater(checked, 0)

    async def test_schemaObjectsTables(self) -> None:
        """
        In a table of functions, C{name(a, b)} exists with exactly those parameters
        (C{...}: any), a C{sequence NAME} exists, a C{channel NAME} is one the code uses.
        """
        functions = await self.functions()
        sequences = {
            r[0]
            for r in await self.db.runQuery(
                "test_sequences",
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = %s AND c.relkind = 'S'",
                (self.schema,),
            )
        }
        checked = 0
        for table in allTables():
            if "function" not in table.heading.lower():
                continue
            for row in table.rows:
                for part in re.split(r",\s*(?![^(]*\))", row[0]):
                    spans = codeSpans(part)
                    if not spans:
                        continue
                    span = spans[0]
                    checked += 1
                    if part.strip().startswith("sequence"):
                        self.assertIn(span, sequences, f"{table.doc}: sequence {span}")
                    elif part.strip().startswith("channel"):
                        channel = span.replace("<schema>", DOC_SCHEMA)
                        self.assertIn(channel, CHANNELS, f"{table.doc}: channel {span}")
                    else:
                        form = _FORM.match(span)
                        self.assertIsNotNone(form, f"{table.doc}: {span}")
                        assert form is not None
                        name, params = form.group(1), form.group(2).strip()
                        self.assertIn(name, functions, f"{table.doc}: {span}")
                        if params != "...":
                            wanted = [p.strip() for p in params.split(",") if p.strip()]
                            self.assertIn(
                                wanted, [o["in"] for o in functions[name]], f"{table.doc}: {span}"
                            )
        self.assertGreater(checked, 0)

    async def test_schemaTables(self) -> None:
        """
        Under "The schema", each C{### `table`} heading's column table lists exactly the
        table's columns.
        """
        rows = await self.db.runQuery(
            "test_columns",
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = %s",
            (self.schema,),
        )
        columns: dict[str, set[str]] = {}
        for table, column in rows:
            columns.setdefault(table, set()).add(column)
        checked = 0
        for table in document("docs/operations.md").tables():
            if not table.header or table.header[0].lower() != "column":
                continue
            [name] = codeSpans(table.heading)
            documented = {c for row in table.rows for c in codeSpans(row[0])}
            self.assertEqual(documented, columns.get(name), f"columns of {name}")
            checked += 1
        self.assertGreater(checked, 0)


def _closing(text: str, start: int) -> int:
    depth = 1
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return len(text)


# --- metrics ---

_METRIC = re.compile(rf"(?<![\w/.]){DOC_SCHEMA}_[a-z0-9_]+(?![\w.(])")


def exportedMetrics() -> dict[str, MetricWrapperBase]:
    """
    Every metric L{Metrics} defines, by the name the docs use for it (counters with
    C{_total}).
    """
    found = {}
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = value
    return found


def sampleNames(metric: MetricWrapperBase) -> set[str]:
    base = metric._name
    return {
        "counter": {base + "_total", base + "_created"},
        "gauge": {base},
        "histogram": {base, base + "_bucket", base + "_sum", base + "_count", base + "_created"},
    }.get(metric._type, {base})


class MetricsTests(SynchronousTestCase):
    def test_mentionedMetricsExported(self) -> None:
        """
        Every C{ctrlgw_...} name in the docs (outside notification channels) is a series
        L{Metrics} exports.
        """
        exported = set().union(*(sampleNames(m) for m in exportedMetrics().values()))
        mentioned = 0
        for doc in documents():
            for name in _METRIC.findall(doc.text):
                if name in CHANNELS:
                    continue
                mentioned += 1
                self.assertIn(name, exported, f"{doc.name} mentions {name}")
        self.assertGreater(mentioned, 0)

    def test_metricTables(self) -> None:
        """
        The metric tables of docs/operations.md list every metric, once, with its type
        and label names.
        """
        exported = exportedMetrics()
        listed: dict[str, tuple[str, str]] = {}
        for table in document("docs/operations.md").tables():
            if not table.header or table.header[0].lower() != "metric":
                continue
            kind, labels = table.column("type"), table.column("labels")
            for row in table.rows:
                [name] = codeSpans(row[0])
                self.assertNotIn(name, listed, f"{name} is listed twice")
                listed[name] = (row[kind], row[labels])
        self.assertEqual(sorted(listed), sorted(exported))
        for name, (kind, labels) in listed.items():
            metric = exported[name]
            self.assertEqual(kind, metric._type, name)
            # "`reason`: `a`, `b`; `scope`: ..." names the labels `reason` and `scope`.
            names = [codeSpans(part)[0] for part in labels.split(";") if codeSpans(part)]
            self.assertEqual(tuple(names), tuple(metric._labelnames), name)


# --- configuration ---

_SECTION_HEADING = re.compile(r"^`\[([^\]]+)\]`$")
_EMPTY = ("*(empty)*", "*(required)*")


class ConfigurationTests(SynchronousTestCase):
    def test_keysAndDefaults(self) -> None:
        """
        Every key in the tables of docs/configuration.md is declared in ctrlgw.config with
        the documented default, and every declared key is in a table.
        """
        declared: dict[str, dict[str, Key]] = {
            section: {k.name: k for k in keys} for section, keys in sectionKeys().items()
        }
        documented: dict[str, set[str]] = {}
        for table in document("docs/configuration.md").tables():
            section = _SECTION_HEADING.match(table.heading)
            if section is None or "key" not in [h.lower() for h in table.header]:
                continue
            name = section.group(1)
            self.assertIn(name, declared, f"[{name}] is documented but not declared")
            keyColumn, defaultColumn = table.column("key"), table.column("default")
            for row in table.rows:
                spans = codeSpans(row[keyColumn])
                if not spans:  # "*any other key*"
                    continue
                [key] = spans
                self.assertIn(key, declared[name], f"[{name}] {key} is not declared")
                documented.setdefault(name, set()).add(key)
                cell = row[defaultColumn]
                default = "" if cell in _EMPTY else codeSpans(cell)[0]
                parse = declared[name][key].parse
                self.assertEqual(
                    parse(default) if default else default,
                    parse(declared[name][key].default) if default else declared[name][key].default,
                    f"[{name}] {key}: documented default {cell}",
                )
        self.assertEqual(
            {s: set(keys) for s, keys in declared.items()}, documented, "undocumented keys"
        )


# --- protocol v1 ---


def _constants(prefix: str = "") -> dict[str, str]:
    return {
        name: value
        for name, value in vars(v1).items()
        if name.isupper() and isinstance(value, str) and name.startswith(prefix)
    }


def errorCodes() -> set[str]:
    return {v for n, v in _constants().items() if not n.startswith("BYE_")}


def _tableUnder(doc: str, heading: str) -> Table:
    [table] = [t for t in document(doc).tables() if t.heading == heading]
    return table


def _sourceOfCtrlgw() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "ctrlgw").rglob("*.py")))


class ProtocolTests(SynchronousTestCase):
    def test_errorCodes(self) -> None:
        """
        The error codes of docs/protocol.md are the codes in ctrlgw.protocol.messages, and
        the gateway uses each of them.
        """
        documented = {codeSpans(row[0])[0] for row in _tableUnder("docs/protocol.md", "Error codes").rows}
        self.assertEqual(documented, errorCodes())
        # Each is used beyond its definition: by name, or (framings) as a literal.
        source = _sourceOfCtrlgw()
        for name, value in _constants().items():
            if value in errorCodes():
                uses = len(re.findall(rf"\b{name}\b", source)) - 1
                self.assertTrue(uses > 0 or f'"{value}",' in source, f"{name} is never sent")

    def test_codesInExamples(self) -> None:
        """
        Every C{"code"} in an example frame of the docs is a documented error code.
        """
        found = 0
        for doc in documents():
            for block in doc.blocks():
                for frame in jsonDocuments(block.text.replace("> ", "").replace("< ", "")):
                    if isinstance(frame, dict) and frame.get("type") == "error":
                        found += 1
                        self.assertIn(frame["code"], errorCodes(), f"{doc.name}: {frame}")
        self.assertGreater(found, 0)

    def test_byeReasons(self) -> None:
        documented = {codeSpans(row[0])[0] for row in _tableUnder("docs/protocol.md", "Bye reasons").rows}
        self.assertEqual(documented, set(_constants("BYE_").values()))

    def test_helloTokenMalformedInEveryMode(self) -> None:
        """
        C{token} is optional and its value matters only in token mode, but a token that
        is not a string of 1-512 characters makes the hello malformed: C{bad_message},
        whatever the auth mode (decoding does not know it).  C{null} is absent.
        """
        for token in (5, "", ["t"], {"t": 1}, True, "t" * (v1.MAX_TOKEN_LENGTH + 1)):
            frame = json.dumps({"type": "hello", "ts": 1, "controller": "c", "token": token})
            with self.assertRaises(v1.ProtocolError) as caught:
                v1.decode(frame.encode())
            self.assertEqual(caught.exception.code, v1.BAD_MESSAGE, token)
        for token, decoded in ((None, None), ("anything", "anything")):
            frame = json.dumps({"type": "hello", "ts": 1, "controller": "c", "token": token})
            self.assertEqual(v1.decode(frame.encode()), v1.Hello(1, "c", decoded))
        [row] = [
            r for r in _tableUnder("docs/protocol.md", "`hello`").rows if codeSpans(r[0]) == ["token"]
        ]
        self.assertIn("`bad_message`", row[2])
        self.assertNotIn("ignored in mode", row[2])


# --- the HTTP listener and API ---

TOKEN = "secret"
CONTROLLER = "dev-1"
COMMAND = "0b7c5a8e-2f41-4c55-9d0e-3a6f1f0c2b11"
UNKNOWN_COMMAND = "00000000-0000-0000-0000-000000000000"
PRESENCE_ROW = (
    CONTROLLER, True, "gw-a", 4, "2520ad44-29b3-4a26-a11d-47d835200e22", "main",
    "127.0.0.1:33488", None, None, None, None,
)


class FakeStore:
    """
    The L{Store} calls the API makes; C{failure}, when set, is raised by every call.
    """

    db = SimpleNamespace(schema=DOC_SCHEMA)

    def __init__(self) -> None:
        self.failure: Exception | None = None

    def _check(self) -> None:
        if self.failure is not None:
            raise self.failure

    async def presence(self, controller: str | None, limit: int = 1000) -> list[tuple[Any, ...]]:
        self._check()
        return [PRESENCE_ROW] if controller in (None, CONTROLLER) else []

    async def commandStatus(self, command: str) -> dict[str, Any] | None:
        self._check()
        return {"id": command, "state": "pending"} if command == COMMAND else None

    async def sendCommand(self, controller: str, body: object, ttl: float) -> str:
        self._check()
        return COMMAND

    async def kickController(self, controller: str, reason: str) -> tuple[str, int] | None:
        self._check()
        return ("gw-a", 6) if controller == CONTROLLER else None


    async def sendCommands(self, controllers: list[str], bodies: list[object], ttl: float) -> list[str]:
        self._check()
        return [COMMAND] * len(controllers)

    async def readStream(self, group: str, limit: int, lease: float) -> list[Any]:
        # Ends an SSE response at once (its loop stops at the first error).
        raise Unavailable("the fake store has no stream")


class _NoListener:
    def subscribe(self, *args: Any) -> None:
        pass


def kickRoute(api: ApiResource) -> None:
    """
    The route the gateway adds to its API for kicks (ctrlgw/kick.py), on the API's store.
    """
    from ctrlgw.registry import ConnectionRegistry

    kicks = Kicks(api.store, ConnectionRegistry(), Metrics(), cast(Any, _NoListener()))
    api.addRoute(b"DELETE", 3, kicks.deleteConnection)


class Response:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.payload = raw.partition(b"\r\n\r\n")
        statusLine, *headerLines = head.decode("latin-1").split("\r\n")
        self.status = int(statusLine.split()[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in headerLines)
        }
        if self.headers.get("transfer-encoding") == "chunked":
            body, rest = b"", self.payload
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                length = int(size, 16)
                if length == 0:
                    break
                body, rest = body + rest[:length], rest[length + 2 :]
            self.payload = body

    def json(self) -> Any:
        return json.loads(self.payload)


def request(
    method: str, path: str, body: bytes = b"", token: str | None = TOKEN,
    store: FakeStore | None = None, apiToken: str = TOKEN, chunked: bool = False,
    extra: str = "",
) -> tuple[Any, StringTransport, Any]:
    """
    Send one request through the real site and HTTP parser (HTTP/1.1 when chunked, else
    HTTP/1.0); the channel's request, if it is still being answered, the transport and
    the channel.
    """
    api = ApiResource(apiToken, cast(Store, store or FakeStore()))
    kickRoute(api)
    _withStream(api)
    site = makeSite(makeRoot(CollectorRegistry(), Readiness(), api))
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    channel.makeConnection(transport)
    version = "1.1" if chunked else "1.0"
    head = f"{method} {path} HTTP/{version}\r\nHost: x\r\nConnection: close\r\n" + extra
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
        data = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536])
            for i in range(0, len(body), 65536)
        ) + b"0\r\n\r\n"
    else:
        head += f"Content-Length: {len(body)}\r\n\r\n"
        data = body
    channel.dataReceived(head.encode() + data)
    pending = channel._channel.requests
    return (pending[0] if pending else None), transport, channel


def _withStream(api: ApiResource) -> ApiResource:
    """
    C{api} with C{GET /v1/stream}, as the gateway builds it.
    """
    from twisted.internet.task import Clock

    from ctrlgw.config import StreamConfig
    from ctrlgw.sse import StreamApi

    reader = StreamReader(api.store, StreamDoorbell(Clock()), Metrics())
    StreamApi(api.store, reader, StreamConfig(1000, 0, 1, 1, 1)).install(api)
    return api


# A request body every documented POST accepts.
ANY_BODY = b'{"body": {"op": "blink"}, "commands": [{"controller": "dev-1", "body": 1}]}'


def served(method: str, path: str, body: bytes = b"", **kwargs: Any) -> Response:
    """
    The answer to one request the site answers at once (the fake store is synchronous).
    """
    pending, transport, channel = request(method, path, body, **kwargs)
    assert pending is None or transport.disconnecting, f"{method} {path} is still being answered"
    channel.connectionLost(Failure(ConnectionDone()))
    return Response(transport.value())


async def servedLater(method: str, path: str, body: bytes = b"", **kwargs: Any) -> Response:
    """
    The answer to one request, once the site has finished it (C{/metrics} answers from a
    thread).
    """
    pending, transport, channel = request(method, path, body, **kwargs)
    if pending is not None and not transport.disconnecting:
        await pending.notifyFinish()
    channel.connectionLost(Failure(ConnectionDone()))
    return Response(transport.value())


def commandBody(size: int) -> bytes:
    """
    A valid command request of exactly C{size} bytes.
    """
    frame = b'{"body": ""}'
    return frame[:-2] + b"x" * (size - len(frame)) + frame[-2:]


_ENDPOINT = re.compile(r"^(GET|POST|PUT|PATCH|DELETE|HEAD) (/\S*)$")


def _concrete(path: str) -> str:
    return path.replace("controllers/{id}", f"controllers/{CONTROLLER}").replace(
        "commands/{id}", f"commands/{COMMAND}"
    )


class HttpTests(SynchronousTestCase):
    def scenarios(self) -> dict[int, list[Response]]:
        """
        Requests that make the API answer each status it can answer.
        """
        post = f"/v1/controllers/{CONTROLLER}/commands"
        down, broken = FakeStore(), FakeStore()
        down.failure = Unavailable("the database is unavailable")
        broken.failure = RuntimeError("boom")
        result = {
            200: [served("GET", "/v1/controllers"), served("GET", f"/v1/commands/{COMMAND}")],
            201: [served("POST", post, b'{"body": 1}')],
            400: [
                served("GET", "/v1/controllers/dev%201"),
                served("GET", "/v1/commands/1234"),
                served("POST", post, b"nope"),
                served("POST", post, b'{"ttl": "2m"}'),
                served("POST", post, b'{"body": 1, "ttl": "0s"}'),
                served("POST", post, b'{"body": 1, "ttl": "soon"}'),
                served("DELETE", f"/v1/controllers/{CONTROLLER}/connection?reason=" + "x" * 201),
            ],
            401: [served("GET", "/v1/controllers", token=None), served("GET", "/v1/controllers", token="x")],
            404: [
                served("GET", f"/v1/commands/{UNKNOWN_COMMAND}"),
                served("GET", "/v1/nope"),
                served("DELETE", f"/v1/controllers/{CONTROLLER}"),
                served("DELETE", "/v1/controllers/dev-offline/connection"),
                served("GET", "/v1/controllers", apiToken=""),
            ],
            413: [served("POST", post, commandBody(MAX_REQUEST_BODY + 1))],
            503: [served("GET", "/v1/controllers", store=down)],
            500: [served("GET", "/v1/controllers", store=broken)],
        }
        self.flushLoggedErrors(RuntimeError)
        for status, responses in result.items():
            for response in responses:
                self.assertEqual(response.status, status, response.raw[:300])
        return result

    def test_statusTable(self) -> None:
        """
        The status table of the HTTP API lists exactly the statuses the API answers, and
        each message or header it quotes is in an answer of that status.
        """
        scenarios = self.scenarios()
        [table] = [
            t for t in document("docs/sending-commands.md").tables()
            if t.heading == "HTTP API" and t.header[0].lower() == "code"
        ]
        documented = set()
        for row in table.rows:
            statuses = [int(s) for s in codeSpans(row[0])]
            documented.update(statuses)
            said = "\n".join(
                [r.raw.decode("latin-1").lower() for s in statuses for r in scenarios[s]]
                + [str(r.json().get("error", "")).lower() for s in statuses for r in scenarios[s]]
            )
            for quoted in codeSpans(row[1]):
                self.assertIn(quoted.lower(), said, f"{row[0]}: {quoted}")
        self.assertEqual(documented, set(scenarios))

    def test_everyAnswerIsJson(self) -> None:
        """
        Every answer is JSON with C{Cache-Control: no-store}; every error has the body
        C{{"error": "..."}}.
        """
        for status, responses in self.scenarios().items():
            for response in responses:
                self.assertEqual(response.headers["content-type"], "application/json", status)
                self.assertEqual(response.headers["cache-control"], "no-store", status)
                if status >= 400:
                    body = response.json()
                    self.assertEqual(list(body), ["error"], status)
                    self.assertIsInstance(body["error"], str)

    def test_endpointTable(self) -> None:
        """
        Every request in the HTTP API's endpoint table is served with its success status.
        """
        [table] = [
            t for t in document("docs/sending-commands.md").tables()
            if t.heading == "HTTP API" and t.header[0].lower() == "request"
        ]
        self.assertTrue(table.rows)
        for row in table.rows:
            [request] = codeSpans(row[0])
            match = _ENDPOINT.match(request)
            assert match is not None, request
            method, path = match.groups()
            response = served(method, _concrete(path), ANY_BODY)
            self.assertEqual(response.status, int(codeSpans(row[1])[0]), request)

    def test_bodyLimit(self) -> None:
        """
        A body of exactly 1 MiB is read (401 without the token, 201 with it); one byte
        more is refused with 413 and the JSON error, with or without the token, declared
        or chunked, and the connection is closed.
        """
        post = f"/v1/controllers/{CONTROLLER}/commands"
        for chunked in (False, True):
            atLimit = commandBody(MAX_REQUEST_BODY)
            self.assertEqual(served("POST", post, atLimit, chunked=chunked).status, 201)
            self.assertEqual(served("POST", post, atLimit, token=None, chunked=chunked).status, 401)
            for token in (TOKEN, None):
                response = served(
                    "POST", post, commandBody(MAX_REQUEST_BODY + 1), token=token, chunked=chunked
                )
                self.assertEqual(
                    (response.status, response.json()), (413, {"error": "request body too large"})
                )
                self.assertEqual(response.headers["connection"], "close")
        # No "100 Continue" after the refusal.
        response = served(
            "POST", post, commandBody(MAX_REQUEST_BODY + 1), extra="Expect: 100-continue\r\n"
        )
        self.assertEqual(response.status, 413)
        self.assertNotIn(b"100 Continue", response.raw)

    def test_documentedBodyLimit(self) -> None:
        """
        The docs' limit on a request body ("at most 1 MiB") is the listener's.
        """
        text = document("docs/sending-commands.md").text
        self.assertIn("at most 1 MiB", text)
        self.assertEqual(MAX_REQUEST_BODY, 1024 * 1024)


class MentionedPathsTests(TestCase):
    async def test_mentionedPathsServed(self) -> None:
        """
        Every path of the HTTP listener the docs mention (C{/readyz}, C{GET /v1/...}) is
        served, and every path the listener serves is mentioned.
        """
        root = makeRoot(
            CollectorRegistry(), Readiness(), _withStream(ApiResource(TOKEN, cast(Store, FakeStore())))
        )
        top = {name.decode() for name in root.children}
        mentioned = set()
        for doc in documents():
            for span in doc.spans():
                method, _, path = span.rpartition(" ")
                if not path.startswith("/") or path.split("/")[1] not in top:
                    continue
                if method and method not in ("GET", "POST"):
                    continue
                mentioned.add(path.split("/")[1])
                response = await servedLater(method or "GET", _concrete(path), ANY_BODY)
                # A bare prefix such as /v1 need only be answered by its own resource
                # (JSON), not the root's "No Such Resource" page.
                prefix = not method and path.count("/") == 1
                self.assertTrue(
                    response.status in (200, 201)
                    or (prefix and response.headers["content-type"] == "application/json"),
                    f"{doc.name}: {span}: {response.status}",
                )
        self.assertEqual(mentioned, top)


# --- presence and times ---


def _presenceExamples() -> list[tuple[str, dict[str, Any]]]:
    """
    Every presence object the docs show: a JSON object with C{controller} and C{online}.
    """
    found = []
    for doc in documents():
        texts = [b.text for b in doc.blocks()] + doc.spans()
        for text in texts:
            for value in jsonDocuments(text):
                for _, item in jsonValues(value):
                    if isinstance(item, dict) and {"controller", "online"} <= set(item):
                        found.append((doc.name, item))
    return found


class PresenceTests(SynchronousTestCase):
    def test_examplesHaveTheFields(self) -> None:
        """
        Every presence object in the docs has the fields of L{presenceJson}: all of them
        for a known controller, three for one that never connected.
        """
        known = set(presenceJson(CONTROLLER, PRESENCE_ROW))
        unknown = set(presenceJson("pump-9", None))
        examples = _presenceExamples()
        self.assertGreaterEqual(len({doc for doc, _ in examples}), 2, examples)
        for doc, example in examples:
            self.assertEqual(set(example), known if example.get("known", True) else unknown, doc)

    def test_apiServesPresenceJson(self) -> None:
        self.assertEqual(
            served("GET", f"/v1/controllers/{CONTROLLER}").json(),
            presenceJson(CONTROLLER, PRESENCE_ROW),
        )
        self.assertEqual(
            served("GET", "/v1/controllers/pump-9").json(), presenceJson("pump-9", None)
        )
        self.assertEqual(
            served("GET", "/v1/controllers").json(),
            {"controllers": [presenceJson(CONTROLLER, PRESENCE_ROW)]},
        )


class TimeFormatTests(SynchronousTestCase):
    def test_examplesUseRfc3339(self) -> None:
        """
        Every time in a JSON example of the docs is RFC 3339, UTC, microseconds, with a Z,
        as L{isoTime} and the SQL API write it.
        """
        checked = 0
        for doc in documents():
            for text in [b.text for b in doc.blocks()] + doc.spans():
                for value in jsonDocuments(text):
                    for key, item in jsonValues(value):
                        if isinstance(item, str) and LOOKS_LIKE_TIME.match(item):
                            checked += 1
                            self.assertRegex(item, RFC3339, f"{doc.name}: {key}")
        self.assertGreater(checked, 0)

    def test_isoTime(self) -> None:
        from datetime import datetime, timedelta, timezone

        when = datetime(2026, 11, 26, 18, 24, 18, 713376, tzinfo=timezone(timedelta(hours=1)))
        self.assertEqual(isoTime(when), "2026-11-26T17:24:18.713376Z")
        self.assertEqual(isoTime(when.replace(microsecond=0)), "2026-11-26T17:24:18.000000Z")


_INI = iniText({"listener:main": {"endpoint": "tcp:0"}})


class SameObjectsTests(PostgresTestCase):
    """
    C{ctrlgw sessions --json} prints the objects C{GET /v1/controllers} serves.
    """

    async def test_cliAndApi(self) -> None:
        store = Store(self.db, "gw-a")
        await self.db.runOperation(
            "test_session",
            "INSERT INTO sessions (controller_id, epoch, session_id, instance_id, online,"
            " listener, peer, connected_at, last_seen_at)"
            " VALUES (%s, 3, %s, 'gw-a', true, 'main', '10.0.0.1:5', now(), now())",
            (CONTROLLER, str(uuid.uuid4())),
        )
        configPath = self.mktemp()
        with open(configPath, "w", encoding="utf-8") as f:
            f.write(_INI)
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(
            reactor,
            ["--config", configPath, "--dsn", self.dsn, "--schema", self.schema, "sessions", "--json"],
            out=out, err=err,
        )
        self.assertEqual((code, err.getvalue()), (0, ""))
        printed = json.loads(out.getvalue())

        answer = await servedLater("GET", "/v1/controllers", store=cast(FakeStore, store))
        self.assertEqual(printed, answer.json()["controllers"])
        [presence] = printed
        self.assertEqual((presence["controller"], presence["known"]), (CONTROLLER, True))
        self.assertRegex(presence["connected_at"], RFC3339)


# --- links ---


class LinkTests(SynchronousTestCase):
    def test_linksStayInTheRepository(self) -> None:
        """
        Every relative link, and every relative path in a code span, of the docs names a
        file of this repository: the docs stand on their own.
        """
        for doc in documents():
            base = (ROOT / doc.name).parent
            targets = [link.split("#")[0] for link in doc.links() if "://" not in link]
            targets += [s for s in doc.spans() if s.startswith("../")]
            for target in targets:
                if not target:
                    continue
                path = (base / target).resolve()
                self.assertTrue(path.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository")
                self.assertTrue(path.exists(), f"{doc.name}: {target} does not exist")

    def test_readmeListsEveryPage(self) -> None:
        listed = {link for link in document("README.md").links() if link.startswith("docs/")}
        pages = {d.name for d in documents() if d.name.startswith("docs/")}
        self.assertEqual(pages - listed, set())


# --- schema versions ---

_VERSION_LIST = re.compile(r"applied versions \[([\d, ]+)\]")
_VERSION = re.compile(r"\b(?:version|need|needs|currently) (\d+)\b")


class SchemaVersionTests(SynchronousTestCase):
    def test_versionsAreTheMigrations(self) -> None:
        """
        Every schema version the docs quote (C{applied versions [1, ...]}, C{already at
        version N}, C{schema version N, need N}, C{(currently N)}) is this release's.
        """
        from ctrlgw.store.migrate import latestVersion, migrations

        quoted = 0
        for doc in documents():
            for line in doc.text.splitlines():
                for listed in _VERSION_LIST.findall(line):
                    quoted += 1
                    self.assertEqual(
                        [int(v) for v in listed.split(",")],
                        [m.version for m in migrations()],
                        f"{doc.name}: {line}",
                    )
                for number in _VERSION.findall(_VERSION_LIST.sub("", line)):
                    quoted += 1
                    self.assertEqual(int(number), latestVersion(), f"{doc.name}: {line}")
        self.assertGreater(quoted, 0)
