"""
C{bench/bench.py --smoke}: every benchmark scenario at tiny sizes, as a subprocess, so the
benchmark never rots.  Its figures are not results: the test checks that every scenario
produced numbers, and that the page and its plots were rendered from them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench.py")
EXTRAS = ("pgqueuer", "asyncpg", "matplotlib")
REQUIRE = "CTRLGW_REQUIRE_PRIVILEGED"


def isNumber(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class BenchSmokeTests(TestCase):
    timeout = 300

    def requireExtras(self) -> None:
        missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
        if not missing:
            return
        reason = f"the bench extras are not installed ({', '.join(missing)}): pip install '.[bench]'"
        if os.environ.get(REQUIRE) == "1":
            self.fail(f"{reason}; {REQUIRE}=1 forbids skipping")
        raise SkipTest(reason)

    async def test_smoke(self) -> None:
        """
        Every scenario runs and reports its figures; every target row has a value; the
        page names every plot and the plots exist.
        """
        self.requireExtras()
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        argv = [BENCH, "--smoke", "--json", os.path.join(out, "bench.json"), "--docs", out]
        if os.environ.get("CTRLGW_TEST_DSN"):
            argv += ["--dsn", os.environ["CTRLGW_TEST_DSN"]]
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable, argv, env=dict(os.environ), path=ROOT
        )
        self.assertEqual(code, 0, stderr.decode(errors="replace")[-4000:])
        with open(os.path.join(out, "bench.json")) as f:
            result = json.load(f)
        s = result["scenarios"]
        self.assertTrue(result["smoke"])

        fleets = s["commands"]["fleets"]
        self.assertEqual(sorted(int(n) for n in fleets), result["sizes"]["fleets"])
        for entry in fleets.values():
            figures = entry["median"]
            for key in ("p50_ms", "p99_ms", "max_ms", "call_p99_ms", "after_call_p99_ms"):
                self.assertTrue(isNumber(figures[key]), (key, figures))
            self.assertEqual(len(entry["series"]["cmd_ms"]), figures["commands"])
            # The split at the commit: the part after it is less than the whole.
            self.assertLess(figures["after_call_p50_ms"], figures["p50_ms"])
        pgq = s["commands"]["pgqueuer"]["median"]
        self.assertEqual(pgq["handled"], pgq["jobs"])
        for key in ("p99_ms", "call_p99_ms", "after_call_p99_ms"):
            self.assertTrue(isNumber(pgq[key]), (key, pgq))
        commit = s["commands"]["commit"]["median"]
        self.assertEqual(commit["commits"], result["sizes"]["commandRate"] * result["sizes"]["commandSeconds"])
        self.assertTrue(isNumber(commit["p99_ms"]))

        for side in ("ctrlgw", "pgqueuer"):
            self.assertGreater(s["backlog"][side]["median"]["per_second"], 0)
        self.assertEqual(s["backlog"]["pgqueuer"]["median"]["handled"], result["sizes"]["backlog"])

        inbound = s["inbound"]["median"]
        self.assertGreater(inbound["per_second"], 0)
        self.assertGreater(inbound["acked"], 0)
        self.assertTrue(isNumber(inbound["p99_ms"]))

        idle = s["idle"]["median"]
        self.assertTrue(isNumber(idle["kb_per_connection"]))
        self.assertTrue(isNumber(idle["cpu_percent"]))
        self.assertEqual(idle["disconnects"], 0)

        self.assertGreater(s["storm"]["median"]["per_second"], 0)

        takeover = s["takeover"]["median"]
        self.assertEqual(takeover["gateway_observed"], result["sizes"]["takeover"])
        self.assertTrue(isNumber(takeover["gateway_p99_ms_bucket"]))
        self.assertTrue(isNumber(takeover["seen_p99_ms"]))

        stream = s["stream"]
        groups = stream["groups"]["median"]
        self.assertGreater(groups["stored"], 0)
        self.assertEqual((groups["missed"], groups["duplicated"]), (0, 0))
        self.assertGreater(stream["read"]["median"]["per_second"], 0)
        latency = stream["latency"]["median"]
        self.assertEqual(latency["handled"], latency["sent"])
        self.assertTrue(isNumber(latency["p99_ms"]))

        self.assertEqual({v["scenario"] for v in result["verdicts"]},
                         {"commands", "backlog", "inbound", "idle", "storm", "takeover", "stream"})
        for verdict in result["verdicts"]:
            self.assertTrue(isNumber(verdict["value"]), verdict)
            self.assertIsInstance(verdict["met"], bool)

        with open(os.path.join(out, "benchmarks.md")) as f:
            page = f.read()
        self.assertIn("Smoke run", page)
        self.assertIn(result["git"]["commit"][:12], page)
        plots = [line.split("](")[1].rstrip(")") for line in page.splitlines() if line.startswith("![")]
        self.assertEqual(len(plots), 4)
        for plot in plots:
            self.assertGreater(os.path.getsize(os.path.join(out, plot)), 1000, plot)


class PartitionsBenchSmokeTests(TestCase):
    timeout = 300

    async def test_smoke(self) -> None:
        """
        C{bench/partitions.py --smoke}: every mode ran the fleet with retention running;
        with partitions every old row is gone, with DELETE the rows removed are counted.
        """
        argv = [os.path.join(ROOT, "bench", "partitions.py"), "--smoke"]
        if os.environ.get("CTRLGW_TEST_DSN"):
            argv += ["--dsn", os.environ["CTRLGW_TEST_DSN"]]
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable, argv, env=dict(os.environ), path=ROOT
        )
        self.assertEqual(code, 0, stderr.decode(errors="replace")[-4000:])
        with open(os.path.join(ROOT, "var", "bench-partitions-smoke.json")) as f:
            result = json.load(f)
        modes = {m["mode"]: m for m in result["modes"]}
        self.assertEqual(set(modes), {"delete", "partitions", "partitions3"})
        for mode in modes.values():
            self.assertGreater(mode["acked"], 0)
            self.assertTrue(isNumber(mode["per_second"]) and isNumber(mode["wal_mb"]))
            self.assertEqual(mode["unanswered"], 0)
        self.assertEqual(modes["partitions3"]["instances"], 3)
        self.assertEqual(modes["partitions"]["old_rows_left"], 0)
        self.assertGreater(modes["partitions"]["partitions_dropped"], 0)
        self.assertEqual(modes["delete"]["partitions_dropped"], 0)
        self.assertEqual(
            modes["delete"]["pruned_rows"], modes["delete"]["old_rows"] - modes["delete"]["old_rows_left"]
        )
        self.assertIn(b"| partitions3 | 3 |", stdout)
