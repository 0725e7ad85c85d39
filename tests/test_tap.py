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
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ctrlgw import tap
from ctrlgw.service import SequentialMultiService
from tests.gateways import TWISTD, TwistdProcess, freePort, twistdEnvironment
from tests.pg import sharedDsn


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
        makeService builds the tree on the reactor it is given, one service per concern,
        in start order.
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
        # The start order (stopping runs it backwards): the listeners last.
        self.assertEqual(names, [
            "gc", "database", "http", "membership", "writers", "clock-check", "retention",
            "partitions", "stream-retention", "heartbeat", "reconcile", "outbox-poll", "connections", "listener:main",
        ])


class TwistdEndToEndTests(TestCase):
    """
    C{twistd ctrlgw} as an operator runs it, from a directory that is not the checkout, so
    the plugin must come from the installed package.
    """

    timeout = 120

    def _env(self) -> dict[str, str]:
        return twistdEnvironment()

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
        child = TwistdProcess.spawn(
            self, ["-n", "--pidfile=", "ctrlgw", "--config", config, "--dsn", dsn], workdir
        )
        # Hellos are refused until the database is up: wait for /readyz as a load
        # balancer would.
        await child.waitReady(httpPort)
        sock = await self._connect(port, child)
        now = int(reactor.seconds() * 1000)
        lines = await deferToThread(self._converse, sock, now)
        child.signal(signal.SIGTERM)
        farewell = await deferToThread(self._readUntilClosed, sock)
        code = await child.waitForExit()
        self.assertEqual([m["type"] for m in lines], ["welcome", "ack"], child.text())
        self.assertEqual(lines[1]["ref"], "m-1")
        self.assertIn({"type": "bye", "reason": "shutdown"},
                      [{"type": m["type"], "reason": m.get("reason")} for m in farewell])
        # twistd ends itself with the signal it received, as a well-behaved daemon does.
        self.assertIn(code, [(0, None), (None, signal.SIGTERM)], child.text())
        self.assertNotIn(b"Traceback", child.output, child.text())

    async def _connect(self, port: int, child: TwistdProcess) -> socket.socket:
        for _ in range(300):
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                if child.ended.called:
                    self.fail(child.text())
                await deferLater(reactor, 0.1, lambda: None)
        self.fail("the gateway never listened:\n" + child.text())

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

    async def _portInUse(self, endpoint: str) -> None:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        description = endpoint.format(port=port)
        config = os.path.join(tempfile.mkdtemp(prefix="ctrlgw-busy-"), "busy.ini")
        with open(config, "w") as f:
            f.write(
                f"[listener:main]\nendpoint = {description}\n"
                f"[http]\nendpoint = tcp:0:interface=127.0.0.1\n"
            )
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["-n", "--pidfile=", "--logfile=-", "ctrlgw", "--config", config,
                     "--dsn", "host=/nonexistent"],
            env=self._env(), path=tempfile.gettempdir(),
        )
        self.assertEqual(code, 1, out + err)
        # One line, on standard error, once: not in the log (standard output here) too.
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, out + err)
        self.assertTrue(
            lines[0].startswith(f"ctrlgw: listener main: cannot listen on {description}: "),
            lines[0],
        )
        self.assertNotIn(b"cannot listen", out)
        self.assertNotIn(b"Traceback", out + err)

    def test_portInUseStopsStartup(self) -> Deferred[None]:
        """
        A listener that cannot bind stops start-up with one line on standard error and
        exit status 1, instead of a gateway that runs without it.
        """
        return Deferred.fromCoroutine(self._portInUse("tcp:{port}:interface=127.0.0.1"))

    def test_proxiedPortInUseStopsStartup(self) -> Deferred[None]:
        """
        So does a listener behind the PROXY protocol (C{haproxy:tcp:...}).
        """
        return Deferred.fromCoroutine(
            self._portInUse("haproxy:tcp:{port}:interface=127.0.0.1")
        )

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
