"""The kernel's connection tracking as the core sees it (``NatLookup``) and pinholes as
conntrack expectations (``PinholeBackend``), both over one ctnetlink socket kept open.

Pinholes are expectations with the NAT of ``nat-follow-master``: the data connection is
RELATED to its control connection (so any firewall accepting related traffic admits it,
iptables, native nftables or firewalld alike, with no rule of ftpalg's in the admin's
chains), the kernel NATs it as it NATs the control connection (mirrored), lets one
connection match it, forgets it after its timeout, and removes it with the control
connection. The kernel requires a helper on the control connection for this; ftpalg's nft
table attaches the built-in ``sane`` helper (see rules.py)."""

from __future__ import annotations

import errno
import logging
import socket

from ..core.seqadj import KernelAdj
from ..core.table import FlowKey, Pinhole, PinholeBusy
from .ctnetlink import CtError, CtNetlink

log = logging.getLogger("ftpalg")


class Conntrack:
    """NatLookup on ctnetlink: reply tuples and kernel sequence adjustment."""

    def __init__(self, nl: CtNetlink) -> None:
        self.nl = nl
        self._failed = 0

    def reply_tuple(self, key: FlowKey) -> FlowKey | None:
        found = self.mapping(key)
        return None if found is None else found[0]

    def mapping(self, key: FlowKey) -> tuple[FlowKey, bool] | None:
        """The reply tuple, and whether the kernel holds a sequence correction for the
        connection (read in the same look-up)."""
        try:
            entry = self.nl.get(key)
        except OSError as e:  # a broken socket or message: no mapping, said once
            if not self._failed:
                log.warning("conntrack look-up failed: %s", e)
            self._failed += 1
            return None
        return None if entry is None else (entry.reply, entry.seqadj is not None)

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int) -> KernelAdj:
        return self.nl.seq_adjust(key, direction, seq, delta)

    def seq_adjust_from(self, key: FlowKey, direction: int, seq: int, delta: int, known: KernelAdj) -> KernelAdj:
        return self.nl.seq_adjust(key, direction, seq, delta, known)


def _packed(addr: str) -> bytes:
    """A pinhole's address (text, as the core keeps it) as the kernel takes it."""
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


class ExpectationPinholes:
    """PinholeBackend: one conntrack expectation per pinhole, created before the line that
    announces it is let through (pyftpdlib connects as soon as it reads PORT) and deleted
    when the core closes it; removal is a plain netlink request (no nf_tables commit, no
    waiting)."""

    def __init__(self, nl: CtNetlink, timeout: float) -> None:
        self.nl = nl
        self.timeout = timeout
        self.close_failures = 0
        nl.on_late_error = self._late_error

    def open(self, ph: Pinhole) -> None:
        try:
            self.nl.expect(ph.master, _packed(ph.peer), _packed(ph.public), ph.public_port, ph.inside_port,
                           ph.active, int(self.timeout))
        except CtError as e:
            if e.errno in (errno.EBUSY, errno.EEXIST):
                raise PinholeBusy(str(e)) from e
            raise

    def close(self, ph: Pinhole) -> None:
        try:
            self.nl.unexpect(_packed(ph.peer), _packed(ph.public), ph.public_port)
        except CtError as e:
            self.close_failures += 1
            log.warning("pinhole_close_failed id=%d: %s", ph.id, e)

    def close_used(self, ph: Pinhole) -> None:
        """Close a pinhole whose transfer is over: the kernel has most likely removed the
        expectation when the data connection matched it, so the delete's answer (ENOENT) is
        not waited for; a real failure is logged when it is read (``_late_error``)."""
        self.nl.unexpect_unacked(_packed(ph.peer), _packed(ph.public), ph.public_port, f"id={ph.id}")

    def _late_error(self, what: str, e: CtError) -> None:
        self.close_failures += 1
        log.warning("pinhole_close_failed %s: %s", what, e)
