"""The kernel played offline: conntrack as a table the caller fills, the sequence
adjustment as the kernel records it (nf_ct_seqadj_set), expectations as a record of what
was asked. One implementation of ``kernel.Kernel`` for ``ftpalg explain`` (which fills the
table from a capture), the tests and ``bench/``.
"""

from __future__ import annotations

from .addr import FlowKey
from .kernel import Found, NotForwarded, Pinhole, PinholeBusy
from .seqadj import KernelAdj


class OfflineKernel:
    """``table``: original tuple -> reply tuple. ``adj``: per connection, the two directions'
    corrections. ``live``: pinholes expected now, by id; ``log``: ("open" | "close", id) in
    order; ``opened``/``closed``: every pinhole, in order. ``fail_adjust`` / ``fail_expect``
    / ``busy``: the kernel refusing a correction, an expectation, or a port (tests);
    ``unforwarded``: connections that have no helper (opened on the gateway itself); ``used``:
    pinholes a data connection consumed (a new expectation of their tuple is accepted)."""

    def __init__(self) -> None:
        self.table: dict[FlowKey, FlowKey] = {}
        self.adj: dict[FlowKey, list[KernelAdj]] = {}
        self.live: dict[int, Pinhole] = {}
        self.log: list[tuple[str, int]] = []
        self.opened: list[Pinhole] = []
        self.closed: list[Pinhole] = []
        self.fail_adjust = False
        self.fail_expect = False
        self.fail_withdraw = False
        self.busy: set[int] = set()  # public ports expected by connections the core does not know
        self.reads = 0  # reads of the kernel's sequence adjustment
        self.following: set[FlowKey] = set()  # connections whose whole stream is queued
        self.follow_log: list[tuple[FlowKey, bool]] = []
        self.handed: dict[FlowKey, bytes] = {}  # passive commands awaiting their reply (hand_over)
        self.unforwarded: set[FlowKey] = set()  # original tuples of connections without a helper
        self.used: set[int] = set()  # live pinholes a data connection consumed (``use``)

    def use(self, pinhole_id: int) -> None:
        """The pinhole's data connection came: the kernel no longer expects its tuple (the
        core hears of it only later, or never)."""
        self.used.add(pinhole_id)

    def mapping(self, key: FlowKey) -> tuple[FlowKey, bool] | None:
        reply = self.table.get(key)
        if reply is not None and key in self.unforwarded:
            raise NotForwarded(reply)
        return None if reply is None else (reply, key in self.adj)

    def seq_state(self, key: FlowKey, direction: int) -> KernelAdj:
        self.reads += 1
        return self.adj.get(key, [KernelAdj(), KernelAdj()])[direction]

    def by_reply(self, key: FlowKey) -> Found | None:
        orig = next((o for o, r in self.table.items() if r == key), None)
        if orig is not None and orig in self.unforwarded:
            raise NotForwarded(orig)
        return None if orig is None else Found(orig, orig in self.adj, self.handed.get(orig, b""))

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int, known: KernelAdj | None) -> KernelAdj:
        """Like the kernel: the new state is written over whatever is held (absolute values),
        from ``known`` if given, else from what is held (read first)."""
        if self.fail_adjust:
            raise OSError(95, "connection has no sequence-adjustment extension")
        a = self.adj.setdefault(key, [KernelAdj(), KernelAdj()])
        if known is None:
            known = self.seq_state(key, direction)
        a[direction] = known.add(seq, delta)
        return a[direction]

    def expect(self, ph: Pinhole) -> None:
        if self.fail_expect:
            raise OSError(1, "simulated failure")
        if ph.public_port in self.busy:
            raise PinholeBusy(ph.public_port)
        tup = (ph.peer, ph.public, ph.public_port)
        if any((o.peer, o.public, o.public_port) == tup for o in self.live.values() if o.id not in self.used):
            raise PinholeBusy(ph.public_port)  # as the kernel: EBUSY while the tuple is expected
        assert ph.id not in self.live, ph
        self.live[ph.id] = ph
        self.opened.append(ph)
        self.log.append(("open", ph.id))

    def follow(self, key: FlowKey, on: bool) -> None:
        (self.following.add if on else self.following.discard)(key)
        self.follow_log.append((key, on))

    def hand_over(self, key: FlowKey, awaiting: bytes) -> None:
        if awaiting:
            self.handed[key] = awaiting
        else:
            self.handed.pop(key, None)

    def withdraw(self, ph: Pinhole, used: bool) -> None:
        if self.fail_withdraw:
            raise OSError(2, "simulated failure")
        del self.live[ph.id]
        self.closed.append(ph)
        self.log.append(("close", ph.id))
