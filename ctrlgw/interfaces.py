"""
The seams between ctrlgw's rooms.

The connection layer (L{ctrlgw.protocol}) talks only to these interfaces: an L{IOwnership}
that admits a controller and numbers its sessions, an L{IMessageSink} that takes inbound
messages and says when they are safe, and an L{ICommandSettler} that hears acks and nacks of
commands.  Each has an in-memory implementation for tests and single-process use next to
the PostgreSQL one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface


@dataclass(frozen=True, slots=True)
class Session:
    """
    One admitted connection of one controller.  C{epoch} strictly increases per controller:
    a higher epoch always supersedes a lower one.
    """

    controller: str
    session: str
    epoch: int
    instance: str
    listener: str = ""
    peer: str = ""


class Unavailable(Exception):
    """
    The gateway cannot take this now (database away, buffer full); the controller should
    retry later.  Answered with an C{error} frame of code C{unavailable}.
    """


class AuthFailed(Exception):
    """
    The hello's controller id or token was refused.  C{reason} is for logs and metrics
    only; the controller is told no more than C{auth_failed}.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Rejected(Exception):
    """
    The database refused this one message for its content; it is not stored and not acked,
    and retransmitting it will not help.
    """


class Fenced(Exception):
    """
    The session is no longer the controller's current one: another connection took over.
    """


class IOwnership(Interface):
    """
    Decides which connection owns a controller.
    """

    instance = Attribute("This gateway instance's id.")

    def claim(
        controller: str, token: str | None, listener: str, peer: str, mode: str | None = None
    ) -> Deferred[Session]:
        """
        Admit a controller and open a new session for it with an epoch higher than any
        before.  C{mode} is the listener's C{auth} (C{none}, C{token}, C{registered});
        C{None}: C{[auth] mode}.  Fails with L{AuthFailed}, L{Unavailable}.
        """

    def release(session: Session, reason: str) -> None:
        """
        The connection of C{session} has ended for C{reason}.  Releasing a session that has
        been superseded changes nothing.
        """


class IMessageSink(Interface):
    """
    Takes inbound messages from controllers.
    """

    def submit(session: Session, messageId: str, deviceTs: int, body: object) -> Deferred[None]:
        """
        Hand over one message.  The Deferred fires once the message is safe (committed),
        and only then may it be acked.  Fails with L{Unavailable} (not taken, not acked;
        the controller retransmits), L{Fenced} (the session was superseded) or
        L{Rejected} (this message can never be stored).
        """

    def accepting(controller: str) -> bool:
        """
        Whether a message of C{controller} would be taken now.  When not, the connection
        stops reading (TCP backpressure) instead of reading what it would have to refuse.
        """

    def whenAccepting(controller: str, callback: Callable[[], object]) -> None:
        """
        Call C{callback} once messages of C{controller} are taken again.
        """


class IControllerConnection(Interface):
    """
    One controller's connection, whatever its dialect: what the registry, the outbox,
    reconciliation and revocation need of it.
    """

    session = Attribute("The L{Session} it was admitted to, or C{None} before that.")
    live = Attribute("Whether it is admitted and not closing: commands may be written.")
    lastHeard = Attribute("When it was last heard from (clock seconds).")
    writesPaused = Attribute("Whether it has stopped reading what we write.")
    maxInflight = Attribute(
        "Commands written and not yet answered that its dialect allows at once, or C{None} "
        "for the gateway's C{max_inflight}."
    )

    def deliver(commandId: str, body: object, expiresMs: int) -> bool:
        """
        Write a command now unless the connection is not live or the command has expired.

        @return: whether it was written.
        @raise ctrlgw.framing.FramingError: it does not fit one frame.
        @raise ValueError: its body is not one this dialect can write (the message says
            why).
        """

    def reply(messageId: str, payload: object) -> bool:
        """
        Answer the controller's request C{messageId} with an application's payload.

        @return: whether it was written: the request is still waiting for an answer.
        """

    def replyError(messageId: str, code: str, description: str) -> bool:
        """
        Answer the controller's request C{messageId} with an error.
        """

    def close(reason: str) -> None:
        """
        Close on purpose for C{reason} (a bye reason: C{takeover}, C{revoked}, ...).
        """


class ICommandSettler(Interface):
    """
    Hears what controllers answered to commands.
    """

    def settle(
        session: Session, ref: str, ok: bool, reason: str, result: object = None
    ) -> None:
        """
        The controller acked (C{ok}) or nacked the command C{ref} on C{session}, with the
        C{result} its dialect carries (a JSON value; C{None}: none).
        """

    def sessionStarted(session: Session) -> None:
        """
        C{session} has just been welcomed: commands waiting for its controller may go.
        """
