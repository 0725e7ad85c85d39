"""
A private PostgreSQL for development, from the C{pgserver} package.

Used when C{[database] dsn} is empty.  Starting and stopping it block for about a second,
so both run in a thread, never on the reactor thread.

pgserver keeps, in the data directory (C{.handle_pids.json}), the PIDs of the processes
using the server, and stops the server when the last of them lets go.  It lets go only at
interpreter exit, though, and twistd stopped by a signal ends by re-raising that signal,
so interpreter exit never comes: L{EmbeddedPostgres.stop} lets go explicitly, from the
gateway's own C{stopService}.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class EmbeddedUnavailable(Exception):
    """
    pgserver is not installed.
    """


def _importPgserver() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs complains about XDG_RUNTIME_DIR on servers; it is harmless here.
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
            import pgserver
    except ImportError:
        raise EmbeddedUnavailable(
            "[database] dsn is empty and the embedded PostgreSQL is not installed: "
            "pip install 'ctrlgw[embedded]' or set [database] dsn"
        ) from None
    return pgserver


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Someone else's process: alive.
    return True


def _release(server: Any) -> list[int]:
    """
    Take this process off the users of C{server}, stopping it (C{pg_ctl -w stop}, fast
    mode) if no other live process uses it; return the PIDs of the users left.

    Blocks: call it in a thread.
    """
    handles = server.global_process_id_list
    # A process that died without letting go (SIGKILL, or twistd before this was fixed)
    # would keep the server running forever: forget the PIDs no longer alive.  Under
    # pgserver's own inter-process lock, as it changes the list only under it.
    with server._lock:
        for pid in handles.get():
            if pid != os.getpid() and not _alive(pid):
                handles.get_and_remove(pid)
    server.cleanup()  # With cleanup_mode "stop": let go, and stop if this was the last user.
    return [int(pid) for pid in handles.get()]


class EmbeddedPostgres:
    """
    This process's use of the embedded server in C{dataDir}.
    """

    def __init__(self, reactor: Any, dataDir: str) -> None:
        self.reactor = reactor
        self.path = os.path.abspath(dataDir)
        self._server: Any = None

    def start(self) -> Deferred[str]:
        """
        Start (or join) the server; fires with its DSN.  Raises L{EmbeddedUnavailable} at
        once when pgserver is not installed.
        """
        pgserver = _importPgserver()
        os.makedirs(self.path, exist_ok=True)
        log.warn(
            "EMBEDDED PostgreSQL in {path}: for development only; set [database] dsn in production",
            path=self.path,
        )
        d: Deferred[Any] = deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(),
            lambda: pgserver.get_server(self.path, cleanup_mode="stop"),
        )

        def started(server: Any) -> str:
            self._server = server
            return str(server.get_uri())

        return d.addCallback(started)

    def stop(self, timeout: float = 30.0) -> Deferred[None]:
        """
        Let go of the server, stopping it unless another live process still uses it (a
        C{ctrlgw} command, say).

        Runs in a daemon thread of its own, not the reactor's pool: a stop that hangs holds
        up neither the reactor nor, after C{timeout} seconds, the process's exit.  Never
        fails: what goes wrong is logged.
        """
        server, self._server = self._server, None
        if server is None:
            return succeed(None)
        return Deferred.fromCoroutine(self._stop(server, timeout))

    async def _stop(self, server: Any, timeout: float) -> None:
        done: Deferred[list[int]] = Deferred()

        def deliver(outcome: list[int] | Failure) -> None:
            if done.called:
                return  # Gave up waiting (timeout) already.
            if isinstance(outcome, Failure):
                done.errback(outcome)
            else:
                done.callback(outcome)

        def run() -> None:
            try:
                outcome: list[int] | Failure = _release(server)
            except BaseException:
                outcome = Failure()
            self.reactor.callFromThread(deliver, outcome)

        log.info("stopping the embedded PostgreSQL in {path}", path=self.path)
        threading.Thread(target=run, name="ctrlgw-embedded-stop", daemon=True).start()
        done.addTimeout(timeout, self.reactor)
        try:
            users = await done
        except Exception as e:
            log.error(
                "could not stop the embedded PostgreSQL in {path}: {error}; "
                "stop it with: pg_ctl -D {path} stop",
                path=self.path, error=str(e) or type(e).__name__,
            )
            return
        if users:
            log.info(
                "embedded PostgreSQL in {path} left running for processes {pids}",
                path=self.path, pids=", ".join(map(str, users)),
            )
        else:
            log.info("embedded PostgreSQL in {path} stopped", path=self.path)


def startEmbedded(reactor: Any, dataDir: str) -> Deferred[str]:
    """
    Start (or join) the embedded server in C{dataDir}; fires with its DSN.

    For a command that exits normally: pgserver lets go at interpreter exit.  A service
    keeps the L{EmbeddedPostgres} and stops it itself.
    """
    return EmbeddedPostgres(reactor, dataDir).start()
