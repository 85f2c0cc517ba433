"""Counters and log lines, read from the core's events (never from its messages).

``Accounting(counters).consume(alg.drain())`` after each packet: each event adds to the
counters it stands for (the names the metrics and ``ftpalg status`` show) and says what a
person needs in the log — a refusal once per connection and reason, a global fault at its
first and every thousandth time. A transfer's audit record goes to ``on_transfer``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

from .addr import key_text
from .events import (
    Close,
    Encrypted,
    Event,
    FlowsEvicted,
    LineRewritten,
    PinholeClosed,
    PinholeOpened,
    Reason,
    Refused,
    Resynced,
    TransferDone,
)

_log = logging.getLogger("ftpalg")
_silent = logging.getLogger("ftpalg.silent")
_silent.propagate = False
_silent.addHandler(logging.NullHandler())

ENCRYPTED_ADVICE = (
    "ftpalg cannot help encrypted control connections (FTPS); through NAT they need passive mode with the "
    "server's passive port range forwarded and its public address configured (vsftpd pasv_address + "
    "pasv_min_port/pasv_max_port, proftpd MasqueradeAddress + PassivePorts, pure-ftpd -P/-p), or a "
    "TLS-terminating proxy on the gateway. Logged once; later ones at info level")


NOT_FORWARDED_ADVICE = (
    "Clients on the gateway itself are not served (through docker-proxy on a Docker host neither): run them "
    "elsewhere, or use the container's address directly. Logged once; later ones at info level")


class Accounting:
    def __init__(self, counters: Counter[str], on_transfer: Callable[[dict[str, object]], None] | None = None,
                 logs: bool = True) -> None:
        self.counters = counters
        self.on_transfer = on_transfer  # the audit sink, if any
        self.log = _log if logs else _silent  # ``explain`` counts without writing log lines

    def consume(self, events: Iterable[Event]) -> None:
        c, log = self.counters, self.log
        for ev in events:
            if isinstance(ev, PinholeOpened):
                ph = ev.pinhole
                c["pinholes_opened"] += 1
                c[f"announced_{ph.form}"] += 1
                if ev.sent != ev.line:
                    c[f"rewritten_{ph.form}"] += 1
                if log.isEnabledFor(logging.INFO):  # the arguments cost more than the call
                    log.info("pinhole open %s flow=%s %s", ph.describe(), key_text(ev.flow),
                             f"{ev.line.strip()!r} -> {ev.sent.strip()!r}" if ev.sent != ev.line
                             else f"{ev.line.strip()!r} unchanged")
            elif isinstance(ev, PinholeClosed):
                c["pinholes_closed"] += 1
                if ev.why is Close.EXPIRED:
                    c["pinholes_expired"] += 1
                elif ev.why is Close.USED:
                    c["pinholes_used"] += 1
                    c["pinhole_close_unacked"] += 1  # withdrawn without waiting for the answer
                elif ev.why is Close.PREEMPTED:
                    c["pinholes_preempted"] += 1
                log.info("pinhole close id=%d: %s", ev.pinhole.id, ev.detail)
            elif isinstance(ev, LineRewritten):
                c["rewrites"] += 1
                if ev.xlat is not None:
                    c[f"nat64_{ev.xlat}"] += 1
                    log.info("nat64 %s flow=%s %r -> %r", ev.xlat, key_text(ev.flow), ev.old.strip(), ev.new.strip())
            elif isinstance(ev, Refused):
                self._refused(ev)
            elif isinstance(ev, TransferDone):
                self._transfer(ev)
            elif isinstance(ev, Encrypted):
                c["encrypted"] += 1
                if c["encrypted"] == 1:
                    log.warning("%s. %s", ev.detail, ENCRYPTED_ADVICE)
                log.info("encrypted flow=%s: control connection switched to TLS; ftpalg stops reading it",
                         key_text(ev.flow))
            elif isinstance(ev, Resynced):
                if ev.first:
                    log.warning("resync flow=%s: %s", key_text(ev.flow), ev.why)
            elif isinstance(ev, FlowsEvicted):
                c["flows_evicted"] += ev.count
                log.warning("flow cap (--max-flows %d) reached: forgot the %d least recently seen control "
                            "connections", ev.cap, ev.count)

    def _refused(self, ev: Refused) -> None:
        c, log = self.counters, self.log
        name = ev.reason.value
        c[name] += 1
        if not ev.detail:  # counted only (a drop whose cause was told already)
            return
        if ev.reason is Reason.NOT_FORWARDED and ev.flow is not None:
            if c[name] == 1:
                log.warning("%s flow=%s: %s. %s", name, key_text(ev.flow), ev.detail, NOT_FORWARDED_ADVICE)
            else:
                log.info("%s flow=%s: passes untouched", name, key_text(ev.flow))
            return
        if ev.flow is not None:
            if ev.first:
                log.warning("%s flow=%s: %s", name, key_text(ev.flow), ev.text())
        elif c[name] == 1 or c[name] % 1000 == 0:
            log.warning("%s (seen %d times): %s", name, c[name], ev.text())

    def _transfer(self, ev: TransferDone) -> None:
        if self.on_transfer is None:
            return
        try:
            self.on_transfer(ev.record)
        except Exception as e:  # the sink's failure must not take the packet with it
            self._refused(Refused(Reason.AUDIT_FAILED, f"audit record not written: {e}"))
