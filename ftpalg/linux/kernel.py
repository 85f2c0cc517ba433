"""The core's kernel port on Linux: ``LinuxKernel``, over one ctnetlink socket kept open.

- ``mapping(key)``: the connection's reply tuple (its NAT mapping) and whether the kernel
  holds a sequence correction for it, in one look-up.
- ``seq_state(key, direction)`` / ``seq_adjust(...)``: read the kernel's sequence adjustment
  of one direction; add a length change to it (read first unless the caller knows it).
- ``expect(ph)`` / ``withdraw(ph, used)``: pinholes as conntrack expectations.

Pinholes are expectations with the NAT of ``nat-follow-master``: the data connection is
RELATED to its control connection (so any firewall accepting related traffic admits it,
iptables, native nftables or firewalld alike, with no rule of ftpalg's in the admin's
chains), the kernel NATs it as it NATs the control connection (mirrored), lets one
connection match it, forgets it after its timeout, and removes it with the control
connection. The kernel requires a helper on the control connection for this; ftpalg's nft
table attaches the built-in ``sane`` helper (see rules.py) to new connections at prerouting.
A connection without one did not come through prerouting as a new one: this host opened it
itself (a client on the gateway; docker-proxy relaying a client on 127.0.0.1 to a container),
or it is older than the rules. ``mapping`` and ``by_reply`` raise ``NotForwarded`` for it:
the core lets it pass, said once, instead of failing at each announcement (EOPNOTSUPP).

A pinhole is withdrawn as itself: by its tuple and the kernel's id of its expectation, learnt
when it was created. A delete by tuple alone would remove whatever expectation holds the
tuple then: after the data connection used this one, the same port may be announced to the
same peer again — by vsftpd tens of milliseconds later, to a session of another worker, whose
book does not know this one — and the late delete of the used pinhole removed the new one
(its data connection refused: 3 to 7 of 4,000 passive sessions through DNAT from one client
address, two workers, vsftpd on 12 passive ports; tests/test_netns_workers.py)."""

from __future__ import annotations

import errno
import logging

from ..core.addr import FlowKey, packed
from ..core.kernel import Found, NotForwarded, Pinhole, PinholeBusy
from ..core.seqadj import KernelAdj
from .ctnetlink import CtError, CtNetlink, Entry
from .rules import FOLLOW_LABEL, HANDOVER_LABELS, HANDOVER_VERBS

log = logging.getLogger("ftpalg")



class LinuxKernel:
    """Conntrack entries, sequence adjustment and expectations on ``nl`` (which the caller
    closes). A pinhole's expectation is created before the line that announces it is let
    through (pyftpdlib connects as soon as it reads PORT) and deleted when the core
    withdraws it; removal is a plain netlink request (no nf_tables commit, no waiting).
    ``pinhole_timeout``: how long the kernel keeps an expectation nobody withdraws.
    ``kernel_ids``: the kernel's id of the expectation of each open pinhole (by pinhole id),
    as many as the core has pinholes open."""

    def __init__(self, nl: CtNetlink, pinhole_timeout: float) -> None:
        self.nl = nl
        self.timeout = pinhole_timeout
        # (peer, public, public port) of each pinhole expected, packed -> its id: what the
        # kernel's expectation events are matched against (``gone``)
        self.expected: dict[tuple[bytes, bytes, int], int] = {}
        self.lookup_failures = 0
        self.close_failures = 0
        self.kernel_ids: dict[int, int] = {}
        nl.on_late_error = self._late_error

    # ---- connections --------------------------------------------------------------------
    def mapping(self, key: FlowKey) -> tuple[FlowKey, bool] | None:
        """The reply tuple of the connection whose original tuple is ``key``, and whether the
        kernel holds a sequence correction for it (read in the same look-up); None if
        conntrack has no such connection, or the look-up failed (logged once). NotForwarded
        if it has no helper (see ``expect``): this host opened it."""
        entry = self._get(key, False)
        if entry is None:
            return None
        if entry.helper is None:
            raise NotForwarded(entry.reply)
        return entry.reply, entry.seqadj is not None

    def _get(self, key: FlowKey, reply: bool) -> Entry | None:
        try:
            return self.nl.get(key, reply)
        except OSError as e:  # a broken socket or message: no mapping, said once
            if not self.lookup_failures:
                log.warning("conntrack look-up failed: %s", e)
            self.lookup_failures += 1
            return None

    def seq_state(self, key: FlowKey, direction: int) -> KernelAdj:
        """The direction's correction as the kernel holds it (one look-up); CtError if the
        connection is gone."""
        return self.nl.seq_state(key, direction)

    def by_reply(self, key: FlowKey) -> Found | None:
        """The connection whose reply tuple is ``key`` (a packet from the server side): its
        original tuple, whether the kernel holds a correction for it, the passive command
        handed over in its labels (``hand_over``); None if none."""
        entry = self._get(key, True)
        if entry is None or entry.orig is None:
            return None
        if entry.helper is None:
            raise NotForwarded(entry.orig)
        code = sum(1 << i for i, b in enumerate(HANDOVER_LABELS) if entry.labels >> b & 1)
        return Found(entry.orig, entry.seqadj is not None, HANDOVER_VERBS[code])

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int, known: KernelAdj | None) -> KernelAdj:
        """Add ``delta`` bytes at the segment of ``direction`` starting at ``seq``; return
        the direction's new correction. ``known``: the kernel's correction as the caller
        knows it (not read again); None: read it first. Raises NoSeqAdjust if the connection
        cannot carry one, CtError if it is gone (``CtNetlink.seq_adjust``)."""
        return self.nl.seq_adjust(key, direction, seq, delta, known)

    def follow(self, key: FlowKey, on: bool) -> None:
        """Mark the connection for the queue rules: every segment of it is queued while
        label FOLLOW_LABEL is set (rules.py), only the selected ones otherwise."""
        self.nl.label(key, FOLLOW_LABEL, on)

    def hand_over(self, key: FlowKey, awaiting: bytes) -> None:
        """Write the passive command the connection awaits the reply to (b"": none) into its
        labels HANDOVER_LABELS, for the next ftpalg's ``by_reply``."""
        code = HANDOVER_VERBS.index(awaiting)
        self.nl.labels(key, {b: bool(code >> i & 1) for i, b in enumerate(HANDOVER_LABELS)})

    # ---- pinholes -----------------------------------------------------------------------
    def expect(self, ph: Pinhole) -> None:
        """Create the pinhole's expectation; PinholeBusy if its tuple is taken. Its kernel id
        is kept for ``withdraw``; without one (gone already when read back: not expected
        here) nothing is ever deleted for it."""
        peer, public = packed(ph.peer), packed(ph.public)
        try:
            exp_id = self.nl.expect(ph.master, peer, public, ph.public_port, ph.inside_port, ph.active,
                                    int(self.timeout))
        except CtError as e:
            if e.errno in (errno.EBUSY, errno.EEXIST):
                raise PinholeBusy(str(e)) from e
            raise
        self.expected[(peer, public, ph.public_port)] = ph.id
        if exp_id is not None:
            self.kernel_ids[ph.id] = exp_id

    def withdraw(self, ph: Pinhole, used: bool) -> None:
        """Delete the pinhole's expectation, and only it: by tuple and kernel id, so that an
        expectation the kernel consumed already is not deleted again in the guise of
        another that holds its tuple now (the kernel answers ENOENT). ``used``: its
        transfer is over, so the kernel has most likely removed it when the data connection
        matched it: the delete's answer (ENOENT) is not waited for, and a real failure is
        logged when it is read (``_late_error``). Otherwise the answer is waited for; a
        failure is counted and logged, not raised."""
        peer, public = packed(ph.peer), packed(ph.public)
        if self.expected.get((peer, public, ph.public_port)) == ph.id:
            del self.expected[(peer, public, ph.public_port)]
        exp_id = self.kernel_ids.pop(ph.id, None)
        if exp_id is None:  # not known as an expectation of this process's: nothing of it to delete
            return
        if used:
            self.nl.unexpect_unacked(peer, public, ph.public_port, exp_id, f"id={ph.id}")
            return
        try:
            self.nl.unexpect(peer, public, ph.public_port, exp_id)
        except CtError as e:
            self.close_failures += 1
            log.warning("pinhole_close_failed id=%d: %s", ph.id, e)

    def gone(self, removed: list[tuple[FlowKey, int | None]]) -> list[int]:
        """The ids of our pinholes among expectations the kernel removed (``removed``: their
        CTA_EXPECT_TUPLE, peer -> public:port, and kernel id, from ``ExpectationEvents``).
        Matched by tuple and id: the removal of another expectation of the same tuple —
        another worker's (every worker hears every removal), or an earlier one of ours whose
        removal is read only after the port was announced again — is not taken for the
        pinhole that holds the tuple now (it would be withdrawn, its transfer refused)."""
        out = []
        for (peer, _, public, port), exp_id in removed:
            key = (peer, public, port)
            pid = self.expected.get(key)
            if pid is None:
                continue
            mine = self.kernel_ids.get(pid)
            if exp_id is not None and mine is not None and mine != exp_id:
                continue
            del self.expected[key]
            out.append(pid)
        return out

    def _late_error(self, what: str, e: CtError) -> None:
        self.close_failures += 1
        log.warning("pinhole_close_failed %s: %s", what, e)
