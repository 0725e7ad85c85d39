"""
The model-checked ownership protocol (docs/model/): each spin run of C{docs/model/check.sh}
is one test.  A run of the real model passes when spin finds no violation in its scope; a
bad variant passes when spin finds the counterexample it must.  Without spin or a C
compiler the tests skip, with C{CTRLGW_REQUIRE_PRIVILEGED=1} (CI, as root) they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(ROOT, "docs", "model", "check.sh")
REQUIRE = "CTRLGW_REQUIRE_PRIVILEGED"
# "<name>: <states> states, <seconds> s, errors <n>[ (<what spin found>)]"
RESULT = re.compile(r"^(?P<name>[\w-]+): (?P<states>[\d.e+]+) states, [\d.]+ s, errors (?P<errors>\d+)")


class ModelTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        missing = [tool for tool in ("spin", "cc") if shutil.which(tool) is None]
        if missing:
            reason = f"{' and '.join(missing)} not installed (Debian: apt-get install spin gcc)"
            if os.environ.get(REQUIRE) == "1":
                self.fail(f"{reason}; {REQUIRE}=1 forbids skipping")
            raise SkipTest(reason)
        self.work = tempfile.mkdtemp(prefix="ctrlgw-model-")
        self.addCleanup(shutil.rmtree, self.work, True)

    async def check(self, name: str, counterexample: bool) -> None:
        out, err, code = await getProcessOutputAndValue(
            "/bin/sh", (CHECK, self.work, name), env=dict(os.environ)
        )
        text = out.decode() + err.decode()
        match = RESULT.search(text)
        self.assertIsNotNone(match, text)
        assert match is not None
        self.assertEqual(match.group("name"), name, text)
        self.assertGreater(float(match.group("states")), 0, text)
        if counterexample:
            self.assertGreaterEqual(int(match.group("errors")), 1, text)
        else:
            self.assertEqual(match.group("errors"), "0", text)
        self.assertEqual(code, 0, text)

    # --- the real model: no violation ---

    async def test_safetyEverything(self) -> None:
        """
        One hello, message traffic, commands, instance death and the prune: every assertion
        (fences, monotonic epochs, nothing released under a live session, no stale abort).
        """
        await self.check("safety-all-1claim", counterexample=False)

    async def test_safetyInbox(self) -> None:
        await self.check("safety-inbox-2claims", counterexample=False)

    async def test_safetyOutbox(self) -> None:
        await self.check("safety-outbox-2claims", counterexample=False)

    async def test_safetyDeath(self) -> None:
        await self.check("safety-death-2claims", counterexample=False)

    async def test_convergenceWithoutNotify(self) -> None:
        """
        Every NOTIFY lost: reconciliation alone leaves at most one live connection, under
        weak fairness (LTL <>[]).
        """
        await self.check("convergence-nonotify-2claims", counterexample=False)

    async def test_convergenceWithDeath(self) -> None:
        await self.check("convergence-death-1claim", counterexample=False)

    # --- the bad variants: spin finds a counterexample ---

    async def test_epochBeforeLock(self) -> None:
        await self.check("bad-epoch-before-lock", counterexample=True)

    async def test_noInFlightGuard(self) -> None:
        await self.check("bad-no-inflight-guard", counterexample=True)

    async def test_unfencedInbox(self) -> None:
        await self.check("bad-unfenced-inbox", counterexample=True)

    async def test_inboxWithoutKeyShare(self) -> None:
        await self.check("bad-inbox-no-keyshare", counterexample=True)

    async def test_releaseIgnoresEpoch(self) -> None:
        await self.check("bad-release-any-epoch", counterexample=True)

    async def test_abortOnStaleRow(self) -> None:
        """
        A round that drops a connection whose row it read at an older epoch (claimed after
        the query's snapshot) drops the newest claimant.
        """
        await self.check("bad-abort-stale", counterexample=True)

    async def test_incrementalRoundsAlone(self) -> None:
        """
        Without the periodic full round, and without time (the overlap), a claim that binds
        after the round that saw it superseded stays live beside its successor (NOTIFY
        lost): docs/model/README.md, "Finding".
        """
        await self.check("bad-incremental-only", counterexample=True)
