"""The NFQUEUE loop: bind, hand each packet to the core, apply its verdict.

Per-packet fault containment: whatever the core raises, the packet is accepted unchanged
and the fault is counted and logged (first occurrence of each exception type, then every
1000th). Timers (pinhole expiry, flow clean-up) run from the same loop, single-threaded.

Fail-open: the queue is configured with NFQA_CFG_F_FAIL_OPEN, so when it is full
(``QUEUE_MAXLEN`` packets waiting for a verdict) or our socket's receive buffer is, the
kernel accepts further packets unchanged instead of dropping them: a flood that outruns this
process costs those packets their rewrite, never the connection. The python binding does not
expose the flag; ``set_queue_flags`` sends the NFQNL_MSG_CONFIG message itself on the bound
queue's own netlink socket (the kernel takes configuration of a queue only from the port id
that bound it, else EPERM).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from time import monotonic, perf_counter_ns
from typing import Any, Protocol

from netfilterqueue import NetfilterQueue

from ..core.accounting import Accounting
from ..core.alg import Alg
from ..core.events import HELD, PASS, Drop, Replace, Verdict
from .stop import SERVING, stop_signals, stopping

log = logging.getLogger("ftpalg")

QUEUE_MAXLEN = 4096  # packets the kernel holds for us before it fails open (or drops)

# <linux/netlink.h>, <linux/netfilter/nfnetlink.h>, <linux/netfilter/nfnetlink_queue.h>
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1 << 0
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid (host order)
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (network order)
_NLATTR = struct.Struct("=HH")  # len, type (host order)


def config_flags_message(queue_num: int, flags: int, mask: int, seq: int) -> bytes:
    """NFQNL_MSG_CONFIG for queue ``queue_num``: set the flags in ``mask`` to their value in
    ``flags`` (NFQA_CFG_MASK + NFQA_CFG_FLAGS, big-endian u32 each), asking for an ACK."""
    attrs = b"".join(_NLATTR.pack(8, kind) + struct.pack("!I", value)
                     for kind, value in ((NFQA_CFG_MASK, mask), (NFQA_CFG_FLAGS, flags)))
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, queue_num) + attrs
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                          NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


class _Replay:
    """Datagrams read off the queue's socket while waiting for the kernel's answer, handed
    to ``NetfilterQueue.run_socket`` as if it read them itself."""

    def __init__(self, datagrams: list[bytes]) -> None:
        self.datagrams = datagrams

    def recv(self, size: int) -> bytes:
        if not self.datagrams:
            raise BlockingIOError(errno.EAGAIN, "replayed everything")
        return self.datagrams.pop(0)


def set_queue_flags(nfq: Any, queue_num: int, flags: int, mask: int, timeout: float = 2.0) -> int:
    """Set queue flags on the bound ``nfq`` (a ``NetfilterQueue``) through its own netlink
    socket; return 0, or the kernel's errno (EPERM: not our queue; EOPNOTSUPP: flag unknown to
    this kernel; ETIMEDOUT: no answer). The ACK is read here, so libnetfilter_queue never
    sees it; packets the kernel queued to the socket before it are handed to ``nfq``'s
    callback, in order, before this returns."""
    seq = int(time.monotonic_ns() & 0x7FFFFFFF) | 1
    sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)  # a dup: same socket
    packets: list[bytes] = []
    result = errno.ETIMEDOUT
    try:
        sock.sendto(config_flags_message(queue_num, flags, mask, seq), (0, 0))
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = sock.recv(1 << 17, socket.MSG_DONTWAIT)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([sock], [], [], left)[0]:
                    break
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # the kernel lost packets for us: not our answer
                    continue
                raise
            if len(data) >= _NLMSGHDR.size + 4:
                _, kind, _, got_seq, _ = _NLMSGHDR.unpack_from(data)
                if kind == NLMSG_ERROR and got_seq == seq:
                    result = -struct.unpack_from("=i", data, _NLMSGHDR.size)[0]
                    break
            packets.append(data)
    finally:
        sock.close()
        if packets:
            nfq.run_socket(_Replay(packets))
    return result


def enable_fail_open(nfq: Any, queue_num: int) -> bool:
    """NFQA_CFG_F_FAIL_OPEN on the bound queue: when it is full the kernel accepts packets
    unchanged instead of dropping them. Logs the outcome; True if it is on."""
    err = set_queue_flags(nfq, queue_num, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN)
    if err == 0:
        log.info("queue %d fails open: beyond %d packets waiting, the kernel passes control packets "
                 "unchanged (not dropped)", queue_num, QUEUE_MAXLEN)
        return True
    log.warning("queue %d: fail-open not available (%s): beyond %d packets waiting, the kernel drops "
                "control packets", queue_num, errno.errorcode.get(err, str(err)), QUEUE_MAXLEN)
    return False


class LatencySink(Protocol):
    def observe(self, ns: int) -> None:
        """One packet took ``ns`` nanoseconds from the callback to its verdict (or to being held)."""


class QueueHandler:
    """``latency``: told each packet's handling time; ``verdicts``: counts packets by their
    final verdict (accepted unchanged, rewritten, dropped); both optional (metrics)."""

    def __init__(self, alg: Alg, queue_num: int, latency: LatencySink | None = None,
                 verdicts: dict[str, int] | None = None, accounting: Accounting | None = None,
                 watch: Iterable[tuple[Any, Callable[[], bool]]] = (),
                 every_second: Callable[[], object] | None = None) -> None:
        self.alg = alg
        self.every_second = every_second  # housekeeping between packets (rules.keep_alive)
        self.watch = tuple(watch)  # (file, callback) pairs served like ``run``'s ``extra``
        self.accounting = accounting or Accounting(alg.counters)  # reads what the core decided
        self.queue_num = queue_num
        self.faults: dict[str, int] = {}
        self.fail_open = False
        self.latency = latency
        self.verdicts = verdicts

    def _on_packet(self, pkt: Any) -> None:
        latency = self.latency
        t0 = perf_counter_ns() if latency is not None else 0
        alg = self.alg
        out: Verdict
        try:
            out = alg.handle(pkt.get_payload(), monotonic(), pkt)
        except Exception as e:  # contain: never let one packet kill the loop
            name = type(e).__name__
            n = self.faults[name] = self.faults.get(name, 0) + 1
            alg.counters["faults"] += 1
            if n == 1 or n % 1000 == 0:
                log.exception("fault #%d (%s) handling a packet; passed unchanged", n, name)
            out = PASS
        released = alg.take_released()  # held packets the core let go: they precede this one
        if out is PASS and not released:  # the common case: unchanged, nothing let go
            pkt.accept()
            if self.verdicts is not None:
                self.verdicts["accepted"] = self.verdicts.get("accepted", 0) + 1
        else:
            for token, v in released:
                self._verdict(token, v)
            if out is HELD:
                pkt.retain()  # keep its payload after this callback; the verdict comes later
            else:
                self._verdict(pkt, out)
        if alg.events:
            self._account()
        if latency is not None:
            latency.observe(perf_counter_ns() - t0)

    def _account(self) -> None:
        try:
            self.accounting.consume(self.alg.drain())
        except Exception:  # a report's fault must not take the packet with it
            self.alg.counters["faults"] += 1
            log.exception("fault in accounting; events dropped")

    def _verdict(self, pkt: Any, out: Verdict) -> None:
        if isinstance(out, Replace):
            pkt.set_payload(out.packet)
            pkt.accept()
            kind = "rewritten"
        elif isinstance(out, Drop):
            pkt.drop()
            kind = "dropped"
        else:
            pkt.accept()
            kind = "accepted"
        if self.verdicts is not None:
            self.verdicts[kind] = self.verdicts.get(kind, 0) + 1

    def _released(self) -> None:
        for token, out in self.alg.take_released():
            self._verdict(token, out)

    def run(self, ready: Any = None, extra: Iterable[tuple[Any, Callable[[], bool]]] = (),
            bound_message: str = "") -> None:
        """Serve until SIGINT/SIGTERM. ``ready()`` is called once bound. ``extra``: (file,
        callback) pairs: the callback runs between packets when its file is readable, and
        returning False stops the loop (a worker's pipe to its parent)."""
        with stopping() as stop:  # the run's, if start-up installed it: a stop that came before is seen
            if stop:
                log.info("stopping on %s before binding NFQUEUE %d", stop.signals[0], self.queue_num)
                return
            stop.phase = "binding the queue"

            def on_bound() -> None:
                stop.phase = SERVING
                if ready:
                    ready()

            nfq = NetfilterQueue()
            nfq.bind(self.queue_num, self._on_packet, max_len=QUEUE_MAXLEN)
            self.fail_open = enable_fail_open(nfq, self.queue_num)
            try:
                with queue_selector(nfq) as (sel, stopped):
                    for f, callback in (*self.watch, *extra):
                        sel.register(f, selectors.EVENT_READ, callback)
                    self._loop(nfq, sel, stopped, on_bound, bound_message or f"bound to NFQUEUE {self.queue_num}")
            finally:
                nfq.unbind()

    def _loop(self, nfq: Any, sel: selectors.BaseSelector, stopped: list[str], ready: Any, bound: str) -> None:
        try:
            if ready:
                ready()
            log.info("%s", bound)
            next_second = 0.0
            while not stopped:
                if self.every_second is not None and time.monotonic() >= next_second:
                    self.every_second()
                    next_second = time.monotonic() + 1.0
                deadline = self.alg.next_deadline()
                if self.every_second is not None:
                    deadline = min(deadline, next_second)
                events = sel.select(max(0.0, deadline - time.monotonic()))
                for key, _ in events:
                    if key.data is not None and not key.data():
                        stopped.append("parent gone")
                if events:
                    nfq.run(block=False)
                now = time.monotonic()
                if now >= deadline:
                    self.alg.on_timer(now)
                    self._released()
                    self._account()
            log.info("stopping on %s", stopped[0])
        finally:
            self.alg.release_all()  # no packet stays held when we go
            self._released()
            self._account()


@contextlib.contextmanager
def queue_selector(nfq: Any) -> Iterator[tuple[selectors.BaseSelector, list[str]]]:
    """A selector on a bound queue's socket that also wakes on SIGINT/SIGTERM (their names
    collect in the list); the previous handlers are restored and the sockets closed on exit
    (the queue stays bound: its owner unbinds it). Inside ``ftpalg run``, the run's handler
    and list (``stop.stopping``: a stop that came before is in it)."""
    with stop_signals() as (wake, stopped):
        sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ)
        sel.register(wake, selectors.EVENT_READ)
        try:
            yield sel, stopped
        finally:
            sel.close()
            sock.close()
