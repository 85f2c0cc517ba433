"""systemd's readiness protocol (sd_notify(3)): ``READY=1`` once the queue is bound, so that
the unit's ``Type=notify`` makes ``systemctl start`` and ``restart`` return when ftpalg serves
(not when its process was forked), ``systemctl status`` say ``activating (start)`` until then,
and a start that fails be a failed start job. A datagram to ``$NOTIFY_SOCKET``; nothing
without it (a terminal, a test, another supervisor)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("ftpalg")


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``STOPPING=1``) to the service manager, if there is one."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("could not tell systemd %s (NOTIFY_SOCKET=%s): %s", state, addr.lstrip("\0"), e)
        return False
    return True


def ready() -> None:
    notify("READY=1")
