"""SIGINT and SIGTERM as a request to stop, never an exception.

``ftpalg run`` installs the handler first thing (``cli.main``) and keeps it to the end: a
stop that arrives in any step of start-up, of serving or of clean-up is recorded, the step
in hand finishes (an nft transaction, a worker's start, the removal of the rules), and the
code that runs next sees the stop and goes down the ordinary way: what was installed is
removed and the run exits 0. An exception raised from the handler instead (the old
``KeyboardInterrupt``) could land anywhere, outside every ``try`` that cleans up: exit 130,
which systemd records as a failure.

Child processes (the rule tools, the workers) are started with both signals blocked
(``signals_held``; the block survives exec): a stop sent to the whole process group (Ctrl-C)
or cgroup (systemd's default ``KillMode=control-group``) does not cut an ``iptables-restore``
short or kill a worker before its own handler is in place. A worker unblocks them once its
handler is installed, and then sees a stop that came meanwhile. The rule tools never do: they
run to the end, milliseconds.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from types import FrameType

# SIGUSR1: a stop for a restart (systemd's RestartKillSignal=): the rules and pinholes stay in
# the kernel for the next ftpalg, and segments wait for it (rules.HANDOVER).
RESTART_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, RESTART_SIGNAL})
SERVING = "serving"  # the phase once the queue (every worker's) is bound


class Stop:
    """While installed: SIGINT/SIGTERM append their name to ``signals`` and make ``wake``
    readable (a wake-up for a select or a wait). ``phase`` says what the process is doing,
    ``during`` what it was doing when the first stop came."""

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.phase = "starting"
        self.during = ""
        self.wake, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._old: dict[int, object] = {}

    def __bool__(self) -> bool:
        return bool(self.signals)

    @property
    def for_restart(self) -> bool:
        """The first stop was SIGUSR1: the next ftpalg takes over what this one leaves."""
        return bool(self.signals) and self.signals[0] == RESTART_SIGNAL.name

    @property
    def in_startup(self) -> bool:
        """A stop (SIGINT/SIGTERM) came before the queue was bound."""
        return self.during not in ("", SERVING)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.signals:
            self.during = self.phase
        self.signals.append(signal.Signals(signum).name)
        with contextlib.suppress(OSError):  # a wake-up already pending is enough
            self._wake_w.send(b"x")

    def install(self) -> None:
        self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def restore(self) -> None:
        """The handlers found at ``install`` back."""
        for s, h in self._old.items():
            if h is not None:  # None: not set from Python, nothing to give back
                signal.signal(s, h)  # type: ignore[arg-type]  # what signal.signal returned
        self._old = {}


_active: Stop | None = None


@contextlib.contextmanager
def stopping() -> Iterator[Stop]:
    """A ``Stop`` installed until exit (then the previous handlers are back). Nested, the
    outer one: a stop that came before, in an earlier step of start-up, is seen at once."""
    global _active
    if _active is not None:
        yield _active
        return
    stop = _active = Stop()
    try:
        stop.install()
        yield stop
    finally:
        _active = None
        stop.restore()
        stop.wake.close()
        stop._wake_w.close()


def restarting() -> bool:
    """Whether the run is stopping for a restart (SIGUSR1 came first)."""
    return _active is not None and _active.for_restart


def release() -> None:
    """Give SIGINT/SIGTERM their previous handlers back (a command that is not ``run``);
    a stop recorded meanwhile is raised again now, to be handled as it would have been."""
    global _active
    stop, _active = _active, None
    if stop is None:
        return
    stop.restore()
    if stop.signals:
        signal.raise_signal(signal.Signals[stop.signals[0]])


@contextlib.contextmanager
def stop_signals() -> Iterator[tuple[socket.socket, list[str]]]:
    """``stopping()`` as (wake socket, list of the signals' names)."""
    with stopping() as stop:
        yield stop.wake, stop.signals


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM blocked in this thread meanwhile: a child started now inherits the
    block across exec; a stop sent to this process meanwhile is handled when it ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unblock() -> None:
    """A child started under ``signals_held``, its handler installed: SIGINT/SIGTERM on,
    one that came meanwhile delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
