"""
Branch tests for L{ctrlgw.protocol.session.SessionProtocol}, the session life every
dialect shares, on a L{task.Clock} and a string transport (v1's wire on top).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import FakeController, makeClock, makeConfig, makeContext


class LiveTests(SynchronousTestCase):
    def test_liveOnlyWhileAdmitted(self) -> None:
        """
        C{live} (what the outbox and the registry's users go by) is true from the welcome
        until the connection closes, and only then.
        """
        config = makeConfig()
        context = makeContext(config, makeClock())
        fake = FakeController(context, config.listeners[0])
        self.assertFalse(fake.protocol.live, "before the hello")
        fake.hello("dev-1")
        self.assertTrue(fake.protocol.live)
        fake.protocol.close("takeover")
        self.assertFalse(fake.protocol.live)

    def test_noDeviceRequestsInV1(self) -> None:
        """
        v1 has no device request waiting for an application's reply: a reply finds none
        (and is counted late by the router), whatever its message id.
        """
        config = makeConfig()
        context = makeContext(config, makeClock())
        fake = FakeController(context, config.listeners[0])
        fake.hello("dev-1")
        self.assertFalse(fake.protocol.reply("m-1", {}))
        self.assertFalse(fake.protocol.replyError("m-1", "GenericError", "no"))
        self.assertEqual(fake.transport.value(), b"", "nothing written")
