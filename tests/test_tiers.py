"""
L{tests.tiers}: every test class is in one tier, by what it uses, and docs/testing.md
describes each tier with the command that runs it.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import tiers
from tests.pg import PostgresTestCase

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "testing.md")


class TierTests(SynchronousTestCase):
    def test_partition(self) -> None:
        """
        The tiers' names, together, are every test class once, and each resolves to it.
        """
        classes = list(tiers.testClasses())
        byTier = {tier: tiers.names(tier) for tier in tiers.TIERS}
        named = [name for names in byTier.values() for name in names]
        self.assertEqual(sorted(named), sorted(f"{c.__module__}.{c.__name__}" for c in classes))
        self.assertEqual(len(named), len(set(named)))
        for tier, names in byTier.items():
            self.assertTrue(names, f"tier {tier} is empty")
            for name in names:
                self.assertEqual(tiers.tierOf(namedAny(name)), tier)

    def test_byWhatTheyUse(self) -> None:
        """
        No logic test has a reactor or a database; the test classes that run twistd are in
        processes; the kernel fault tests are privileged.
        """
        for name in tiers.names("logic"):
            cls = namedAny(name)
            self.assertFalse(issubclass(cls, TestCase), name)
            self.assertFalse(issubclass(cls, PostgresTestCase), name)
        processes = tiers.names("processes")
        for name in ("tests.test_processes.TwoProcessTests", "tests.test_cli_commands.CliCommandTests",
                     "tests.test_readme_tour.ReadmeTourTests"):
            self.assertIn(name, processes)
        self.assertIn("tests.test_faults_network.KernelBlackholeTests", tiers.names("privileged"))
        self.assertIn("tests.test_slow_reader.SlowReaderTests", tiers.names("reactor"))

    def test_main(self) -> None:
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(tiers.main(["privileged"]), 0)
        self.assertEqual(out.getvalue().split(), tiers.names("privileged"))

    def test_documented(self) -> None:
        with open(DOC, encoding="utf-8") as f:
            text = f.read()
        for tier in tiers.TIERS:
            self.assertIn(f"python -m tests.tiers {tier}", text)
        self.assertIn("make mutate", text)
