"""
What an operator looks at: the exposition stays lean (no C{_created} series, bounded
labels, C{promtool check metrics} clean), the Grafana dashboard and the alert rules query
only series the gateway exports, the rules pass their C{promtool test rules} unit tests,
and a real Prometheus scrapes a real gateway.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, readBody

from ctrlgw.metrics import Metrics
from tests.faults import requireFaults
from tests.gateways import TwistdProcess, freePort, httpPort, sleep, startGateway
from tests.helpers import deferred
from tests.pg import PostgresTestCase

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "etc" / "grafana" / "ctrlgw.json"
RULES = ROOT / "etc" / "prometheus" / "ctrlgw-alerts.yml"
RULE_TESTS = ROOT / "etc" / "prometheus" / "ctrlgw-alerts.test.yml"

# Labels Prometheus adds to every series, and the histogram bucket bound.
TARGET_LABELS = {"instance", "job", "le"}
# The only label names the gateway may use: each takes a bounded set of values (a listener
# name, a reason, a state, a call name...), never a controller id.
BOUNDED_LABELS = {"listener", "reason", "scope", "type", "code", "state", "source", "result",
                  "outcome", "generation", "group",
                  "query", "writer", "table", "kind"}

_SELECTOR = re.compile(r"\b(ctrlgw_[a-z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def gatewayMetrics() -> list[MetricWrapperBase]:
    return [v for v in vars(Metrics()).values() if isinstance(v, MetricWrapperBase)]


def exportedSeries() -> dict[str, set[str]]:
    """
    Every series name the gateway exports, with the label names it carries.
    """
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    series = {}
    for metric in gatewayMetrics():
        labels = set(metric._labelnames)
        for suffix in suffixes[metric._type]:
            series[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return series


def unknownReferences(expr: str) -> list[str]:
    """
    What C{expr} names that the gateway does not export: series, label matchers on them,
    and grouping labels no series of the expression carries.
    """
    exported = exportedSeries()
    problems, carried = [], set(TARGET_LABELS)
    for name, matchers in _SELECTOR.findall(expr):
        if name not in exported:
            problems.append(f"no series {name}")
            continue
        carried |= exported[name]
        for label in _MATCHER.findall(matchers):
            if label not in exported[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
    if not _SELECTOR.search(expr) and "up{" not in expr:
        problems.append("queries no ctrlgw series")
    for grouping in _GROUPING.findall(expr):
        for label in (part.strip() for part in grouping.split(",")):
            if label and label not in carried:
                problems.append(f"groups by {label}, which no series here carries")
    return problems


def dashboardExpressions() -> Iterator[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def alertRules() -> list[dict[str, object]]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


class ExpositionTests(SynchronousTestCase):
    def exposition(self) -> str:
        metrics = Metrics()
        # One sample of every metric, so the text holds every kind of series.
        for metric in vars(metrics).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            target = metric.labels(*("x" for _ in metric._labelnames)) if metric._labelnames else metric
            if metric._type == "gauge":
                target.set(1)  # type: ignore[attr-defined]
            elif metric._type == "counter":
                target.inc()  # type: ignore[attr-defined]
            else:
                target.observe(0.01)  # type: ignore[attr-defined]
        return generate_latest(metrics.registry).decode()

    def test_noCreatedSeries(self) -> None:
        """
        No counter or histogram exports a C{_created} series.
        """
        text = self.exposition()
        self.assertIn("ctrlgw_disconnects_total", text)
        self.assertNotIn("_created", text)

    def test_boundedLabels(self) -> None:
        """
        Every label name is one of a short list of bounded ones: no controller (or
        session, message, command) id is ever a label.
        """
        for metric in gatewayMetrics():
            self.assertTrue(set(metric._labelnames) <= BOUNDED_LABELS, (metric._name, metric._labelnames))

    def test_promtoolCheckMetrics(self) -> None:
        """
        C{promtool check metrics} finds nothing to complain about.
        """
        requireFaults(self, tools=["promtool"])
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=self.exposition(), capture_output=True,
            text=True, timeout=60,
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))


class DashboardTests(SynchronousTestCase):
    def test_queriesExportedSeries(self) -> None:
        """
        Every query of the dashboard names only series and labels the gateway exports.
        """
        expressions = list(dashboardExpressions())
        self.assertGreater(len(expressions), 20)
        for title, expr in expressions:
            self.assertEqual(unknownReferences(expr), [], f"{title}: {expr}")

    def test_checkerFindsStrangers(self) -> None:
        """
        The check above would see a misspelt series, label or grouping.
        """
        self.assertEqual(unknownReferences('rate(ctrlgw_frames_in_total{type="msg"}[1m])'), [])
        self.assertEqual(unknownReferences("ctrlgw_nonsense"), ["no series ctrlgw_nonsense"])
        self.assertEqual(
            unknownReferences('ctrlgw_db_up{query="x"}'), ["ctrlgw_db_up has no label query"]
        )
        self.assertEqual(
            unknownReferences("sum by (controller) (ctrlgw_open_connections)"),
            ["groups by controller, which no series here carries"],
        )

    def test_covers(self) -> None:
        """
        The dashboard shows what issue 14 lists: connections, hello / takeover /
        disconnect rates, inbound and acks, command queue and latency, DB latency by name,
        clock skew and readiness.
        """
        text = " ".join(expr for _, expr in dashboardExpressions())
        for needed in [
            "ctrlgw_open_connections", 'ctrlgw_frames_in_total{type="hello"}',
            "ctrlgw_takeovers_total", "sum by (reason) (rate(ctrlgw_disconnects_total",
            'ctrlgw_frames_in_total{type="msg"}', 'ctrlgw_frames_out_total{type="ack"}',
            "ctrlgw_command_queue", "ctrlgw_command_enqueue_to_acked_seconds_bucket",
            "sum by (query, le) (rate(ctrlgw_db_query_seconds_bucket",
            "ctrlgw_instance_clock_skew_seconds", "ctrlgw_ready",
        ]:
            self.assertIn(needed, text)


class AlertRuleTests(SynchronousTestCase):
    def test_queriesExportedSeries(self) -> None:
        rules = alertRules()
        self.assertEqual(
            {rule["alert"] for rule in rules},
            {"CtrlgwInstanceNotReady", "CtrlgwDatabaseDown", "CtrlgwDatabaseErrors",
             "CtrlgwClockSkew", "CtrlgwCommandQueueGrowing", "CtrlgwFlappingControllers",
             "CtrlgwConsumerGroupFallingBehind", "CtrlgwPartitionsNotAhead"},
        )
        for rule in rules:
            self.assertEqual(unknownReferences(str(rule["expr"])), [], rule["alert"])

    def test_promtool(self) -> None:
        """
        C{promtool check rules} accepts the rules and C{promtool test rules} passes their
        unit tests (each alert fires when it should and stays quiet otherwise).
        """
        requireFaults(self, tools=["promtool"])
        check = subprocess.run(
            ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertIn("SUCCESS: 8 rules found", check.stdout)
        test = subprocess.run(
            ["promtool", "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(test.returncode, 0, test.stdout + test.stderr)
        self.assertIn("SUCCESS", test.stdout)
        tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
        self.assertEqual(tested, {rule["alert"] for rule in alertRules()})


class PrometheusScrapeTests(PostgresTestCase):
    timeout = 120

    @deferred
    async def test_scrapesGateway(self) -> None:
        """
        A real Prometheus scrapes a real gateway's /metrics; its HTTP API then answers a
        query for one of the gateway's series, with the gateway's value.
        """
        requireFaults(self, tools=["prometheus"])
        gateway = await startGateway(self, self.dsn, self.schema, "gw-prom")
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        (workdir / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "ctrlgw",
                "static_configs": [{"targets": [f"127.0.0.1:{httpPort(gateway)}"]}],
            }],
        }))
        webPort = freePort()
        process = TwistdProcess()
        binary = shutil.which("prometheus") or "prometheus"
        process.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            process, binary,
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{webPort}"],
            env={"PATH": "/usr/bin:/bin"}, path=str(workdir),
        )

        async def stop() -> None:
            if not process.ended.called:
                process.signal(15)
                await process.ended

        self.addCleanup(stop)
        agent = Agent(reactor, connectTimeout=5)
        query = quote('ctrlgw_ready{job="ctrlgw"}')
        url = f"http://127.0.0.1:{webPort}/api/v1/query?query={query}".encode()
        result: list[dict[str, object]] = []
        deadline = reactor.seconds() + 60  # type: ignore[attr-defined]
        while not result and reactor.seconds() < deadline:  # type: ignore[attr-defined]
            self.assertFalse(process.ended.called, process.text())
            try:
                response = await agent.request(b"GET", url)
                body = json.loads(await readBody(response))
                if body.get("status") == "success":
                    result = body["data"]["result"]
            except (ConnectionError, OSError, ValueError):
                pass
            except Exception as e:  # Not listening yet (a Twisted connection error).
                if "Connection" not in type(e).__name__:
                    raise
            if not result:
                await sleep(0.5)
        self.assertEqual(len(result), 1, process.text())
        [series] = result
        labels = series["metric"]
        assert isinstance(labels, dict)
        self.assertEqual(labels["instance"], f"127.0.0.1:{httpPort(gateway)}")
        self.assertEqual(labels["__name__"], "ctrlgw_ready")
        value = series["value"]
        assert isinstance(value, list)
        self.assertEqual(value[1], "1")
        # The scrape itself was clean: Prometheus's own up series for the target is 1.
        response = await agent.request(
            b"GET", f"http://127.0.0.1:{webPort}/api/v1/query?query=up".encode()
        )
        [up] = json.loads(await readBody(response))["data"]["result"]
        self.assertEqual(up["value"][1], "1")
