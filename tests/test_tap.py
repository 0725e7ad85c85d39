"""
The twistd plugin: discovery, options, and C{twistd ctrlgw} end to end as a real process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import uuid

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ctrlgw import tap
from ctrlgw.service import SequentialMultiService
from tests.pg import sharedDsn

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PluginTests(SynchronousTestCase):
    def test_discovered(self) -> None:
        """
        twisted.plugin finds the ctrlgw service maker, and it points at ctrlgw.tap.
        """
        makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "ctrlgw"]
        self.assertTrue(makers)
        self.assertEqual(makers[0].module, "ctrlgw.tap")

    def test_optionsOverrideFile(self) -> None:
        """
        --listen, --instance-id, --http and --dsn win over the ini file.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[listener:main]\nendpoint = tcp:7000\n[gateway]\ninstance_id = fromfile\n")
        options = tap.Options()
        options.parseOptions(
            ["--config", path, "--listen", "tcp:7100", "--instance-id", "gw-9",
             "--http", "tcp:9100", "--dsn", "host=/nowhere"]
        )
        config = options.gatewayConfig
        assert config is not None
        self.assertEqual(config.listeners[0].endpoint, "tcp:7100")
        self.assertEqual(config.instance_id, "gw-9")
        self.assertEqual(config.http.endpoint, "tcp:9100")
        self.assertEqual(config.database.dsn, "host=/nowhere")

    def test_makeServiceTakesReactor(self) -> None:
        """
        makeService builds the tree on the reactor it is given, one service per concern.
        """
        from twisted.internet.testing import MemoryReactorClock

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[listener:main]\nendpoint = tcp:7000\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        memoryReactor = MemoryReactorClock()
        service = tap.makeService(options, memoryReactor)
        self.assertIsInstance(service, SequentialMultiService)
        names = [child.name for child in service]
        for expected in ("database", "http", "writers", "clock-check", "retention",
                         "connections", "listener:main"):
            self.assertIn(expected, names)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        value = reason.value  # type: ignore[attr-defined]
        self.ended.callback((value.exitCode, value.signal))


class TwistdEndToEndTests(TestCase):
    """
    C{twistd ctrlgw} as an operator runs it, from a directory that is not the checkout, so
    the plugin must come from the installed package.
    """

    timeout = 120

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        return env

    async def _runGateway(self) -> None:
        dsn = await deferToThread(sharedDsn)
        schema = "t_" + uuid.uuid4().hex[:12]
        port, httpPort = freePort(), freePort()
        workdir = tempfile.mkdtemp(prefix="ctrlgw-twistd-")
        config = os.path.join(workdir, "gw.ini")
        with open(config, "w") as f:
            f.write(
                f"[listener:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                f"[database]\nschema = {schema}\n"
                f"[http]\nendpoint = tcp:{httpPort}:interface=127.0.0.1\n"
            )
        collect = _Collect()
        process = reactor.spawnProcess(
            collect, TWISTD,
            [TWISTD, "-n", "--pidfile=", "ctrlgw", "--config", config, "--dsn", dsn],
            env=self._env(), path=workdir,
        )
        try:
            await self._waitReady(httpPort, collect)
            sock = await self._connect(port, collect)
            now = int(reactor.seconds() * 1000)
            lines = await deferToThread(self._converse, sock, now)
            process.signalProcess(signal.SIGTERM)
            farewell = await deferToThread(self._readUntilClosed, sock)
            code = await collect.ended
        finally:
            if collect.ended.called is False:
                process.signalProcess(signal.SIGKILL)
                await collect.ended
        self.assertEqual([m["type"] for m in lines], ["welcome", "ack"], collect.output)
        self.assertEqual(lines[1]["ref"], "m-1")
        self.assertIn({"type": "bye", "reason": "shutdown"},
                      [{"type": m["type"], "reason": m.get("reason")} for m in farewell])
        # twistd ends itself with the signal it received, as a well-behaved daemon does.
        self.assertIn(code, [(0, None), (None, signal.SIGTERM)], collect.output.decode(errors="replace"))
        self.assertNotIn(b"Traceback", collect.output, collect.output.decode(errors="replace"))

    async def _waitReady(self, httpPort: int, collect: _Collect) -> None:
        """
        Hellos are refused until the database is up: wait for /readyz as a load balancer
        would.
        """
        from twisted.web.client import Agent, readBody

        agent = Agent(reactor)
        for _ in range(300):
            try:
                response = await agent.request(b"GET", b"http://127.0.0.1:%d/readyz" % httpPort)
                await readBody(response)
                if response.code == 200:
                    return
            except Exception:
                pass
            if collect.ended.called:
                self.fail(collect.output.decode(errors="replace"))
            await deferLater(reactor, 0.1, lambda: None)
        self.fail("never ready:\n" + collect.output.decode(errors="replace"))

    async def _connect(self, port: int, collect: _Collect) -> socket.socket:
        for _ in range(300):
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                if collect.ended.called:
                    self.fail(collect.output.decode(errors="replace"))
                await deferLater(reactor, 0.1, lambda: None)
        self.fail("the gateway never listened:\n" + collect.output.decode(errors="replace"))

    @staticmethod
    def _converse(sock: socket.socket, now: int) -> list[dict[str, object]]:
        reader = sock.makefile("rb")
        sock.sendall(json.dumps({"type": "hello", "controller": "e2e-1", "ts": now}).encode() + b"\n")
        welcome = json.loads(reader.readline())
        sock.sendall(json.dumps({"type": "msg", "id": "m-1", "ts": now, "body": {"v": 1}}).encode() + b"\n")
        ack = json.loads(reader.readline())
        return [welcome, ack]

    @staticmethod
    def _readUntilClosed(sock: socket.socket) -> list[dict[str, object]]:
        frames = []
        with sock, sock.makefile("rb") as reader:
            for line in reader:
                frames.append(json.loads(line))
        return frames

    def test_runsAndShutsDownWithBye(self) -> Deferred[None]:
        """
        twistd ctrlgw serves a controller (welcome, ack of a durable message) and, on
        SIGTERM, says bye (shutdown) and exits cleanly without a traceback.
        """
        return Deferred.fromCoroutine(self._runGateway())

    async def _helpAndErrors(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["ctrlgw", "--help"], env=self._env(), path=tempfile.gettempdir()
        )
        self.assertEqual(code, 0, err)
        for option in (b"--config", b"--listen", b"--instance-id", b"--http", b"--dsn"):
            self.assertIn(option, out)

        bad = os.path.join(tempfile.mkdtemp(prefix="ctrlgw-bad-"), "bad.ini")
        with open(bad, "w") as f:
            f.write("[listener:main]\nendpoint = tcp:7000\n[liveness]\nping_interval = soon\n")
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "ctrlgw", "--config", bad], env=self._env(),
            path=tempfile.gettempdir(),
        )
        self.assertNotEqual(code, 0)
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn(f"{bad}: [liveness] ping_interval:", lines[0])
        self.assertNotIn(b"Traceback", out + err)

    async def _portInUse(self) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        config = os.path.join(tempfile.mkdtemp(prefix="ctrlgw-busy-"), "busy.ini")
        with open(config, "w") as f:
            f.write(
                f"[listener:main]\nendpoint = tcp:{port}:interface=127.0.0.1\n"
                f"[http]\nendpoint = tcp:0:interface=127.0.0.1\n"
            )
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "--logfile=-", "ctrlgw", "--config", config,
                     "--dsn", "host=/nonexistent"],
            env=self._env(), path=tempfile.gettempdir(),
        )
        self.assertEqual(code, 1, out + err)
        self.assertIn(f"ctrlgw: listener main: cannot listen on tcp:{port}".encode(), out + err)
        self.assertNotIn(b"Traceback", out + err)

    def test_portInUseStopsStartup(self) -> Deferred[None]:
        """
        A listener that cannot bind stops start-up with one line and exit status 1,
        instead of a gateway that runs without it.
        """
        return Deferred.fromCoroutine(self._portInUse())

    def test_helpAndConfigErrors(self) -> Deferred[None]:
        """
        --help documents every option; a bad value stops start-up with one line naming
        file, section and key.
        """
        return Deferred.fromCoroutine(self._helpAndErrors())


class JsonLogTests(SynchronousTestCase):
    def test_jsonLinesWithFields(self) -> None:
        """
        ctrlgw.logs.jsonToStdout, the factory for twistd --logger, writes each event as
        one JSON line that keeps the event's keyword fields.
        """
        import io
        from unittest import mock

        from twisted.logger import Logger

        from ctrlgw import logs

        out = io.StringIO()
        with mock.patch.object(sys, "stdout", out):
            observer = logs.jsonToStdout()
        Logger(namespace="ctrlgw.test", observer=observer).info(
            "{controller} taken over by {instance}", controller="dev-1", instance="gw-2"
        )
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        event = json.loads(lines[0])
        self.assertEqual(
            (event["controller"], event["instance"], event["log_namespace"]),
            ("dev-1", "gw-2", "ctrlgw.test"),
        )
