"""
Where controllers' answers to commands go when no outbox is configured.
"""

from __future__ import annotations

from twisted.logger import Logger
from zope.interface import implementer

from ctrlgw.interfaces import ICommandSettler, Session

log = Logger()


@implementer(ICommandSettler)
class RecordingSettler:
    """
    Keeps the last answers in memory (bounded) and logs them.
    """

    def __init__(self, keep: int = 1000) -> None:
        self.keep = keep
        self.answers: list[tuple[Session, str, bool, str]] = []
        self.started: list[Session] = []
        self.results: list[object] = []

    def settle(
        self, session: Session, ref: str, ok: bool, reason: str, result: object = None
    ) -> None:
        log.debug("{controller} {verdict} {ref}", controller=session.controller,
                  verdict="acked" if ok else "nacked", ref=ref)
        self.answers.append((session, ref, ok, reason))
        self.results.append(result)
        del self.results[: -self.keep]
        del self.answers[: -self.keep]

    def sessionStarted(self, session: Session) -> None:
        self.started.append(session)
        del self.started[: -self.keep]
