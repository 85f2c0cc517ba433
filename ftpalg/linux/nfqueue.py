"""The NFQUEUE loop: bind, hand each packet to the core, apply its verdict.

Per-packet fault containment: whatever the core raises, the packet is accepted unchanged
and the fault is counted and logged (first occurrence of each exception type, then every
1000th). Timers (pinhole expiry, flow clean-up) run from the same loop, single-threaded.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import time
from types import FrameType
from typing import Any

from netfilterqueue import NetfilterQueue

from ..core.table import Alg, Held

log = logging.getLogger("ftpalg")

TICK = 1.0
QUEUE_MAXLEN = 4096  # packets the kernel holds for us before it applies the bypass/drop


class QueueHandler:
    def __init__(self, alg: Alg, queue_num: int) -> None:
        self.alg = alg
        self.queue_num = queue_num
        self.faults: dict[str, int] = {}

    def _on_packet(self, pkt: Any) -> None:
        try:
            out = self.alg.handle(pkt.get_payload(), time.monotonic(), pkt)
        except Exception as e:  # contain: never let one packet kill the loop
            name = type(e).__name__
            n = self.faults[name] = self.faults.get(name, 0) + 1
            self.alg.counters["faults"] += 1
            if n == 1 or n % 1000 == 0:
                log.exception("fault #%d (%s) handling a packet; passed unchanged", n, name)
            out = None
        if isinstance(out, Held):
            pkt.retain()  # keep its payload after this callback; the verdict comes later
        self._released()  # held packets the core let go: they precede this one
        if not isinstance(out, Held):
            self._verdict(pkt, out)

    @staticmethod
    def _verdict(pkt: Any, out: bytes | None) -> None:
        if out is None:
            pkt.accept()
        elif not out:
            pkt.drop()
        else:
            pkt.set_payload(out)
            pkt.accept()

    def _released(self) -> None:
        for token, out in self.alg.take_released():
            self._verdict(token, out)

    def run(self, ready: Any = None) -> None:
        """Serve until SIGINT/SIGTERM. ``ready()`` is called once bound."""
        nfq = NetfilterQueue()
        nfq.bind(self.queue_num, self._on_packet, max_len=QUEUE_MAXLEN)

        wake_r, wake_w = socket.socketpair()
        stopped: list[str] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            stopped.append(signal.Signals(signum).name)
            wake_w.send(b"x")

        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        sel.register(wake_r, selectors.EVENT_READ)
        try:
            if ready:
                ready()
            log.info("bound to NFQUEUE %d", self.queue_num)
            next_tick = time.monotonic() + TICK
            while not stopped:
                hold = self.alg.next_hold_deadline()
                deadline = next_tick if hold is None else min(next_tick, hold)
                if sel.select(max(0.0, deadline - time.monotonic())):
                    nfq.run(block=False)
                now = time.monotonic()
                if hold is not None and now >= hold:
                    self.alg.expire_held(now)
                    self._released()
                if now >= next_tick:
                    self.alg.tick(now)
                    next_tick = now + TICK
            log.info("stopping on %s", stopped[0])
        finally:
            self.alg.release_all()  # no packet stays held when we go
            self._released()
            for s, h in old.items():
                signal.signal(s, h)
            sel.close()
            for s_ in (sock, wake_r, wake_w):
                s_.close()
            nfq.unbind()
