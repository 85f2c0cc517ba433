"""The kernel, as far as the core needs it: one port.

The core never talks to the kernel itself. What it needs of it — the NAT mapping of a
control connection, the sequence adjustment (seqadj) that carries a rewrite's length
change (read, and added to), and data connections let in as expectations — goes through
an object with these methods, given to ``Alg``. ``ftpalg.linux.kernel.LinuxKernel`` is the
one that talks netlink; ``offline.OfflineKernel`` plays the kernel for ``explain``, the
tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

from .addr import NO_KEY, FlowKey, hostport
from .seqadj import KernelAdj


@dataclass(frozen=True, slots=True)
class Pinhole:
    """Let ``peer`` (any port) connect to ``public``:``public_port``; send it to
    ``inside``:``inside_port`` (DNAT unless equal) and let it leave from ``snat`` (SNAT, if
    set). One connection only; ``expires`` on the caller's clock."""

    id: int
    peer: str
    public: str
    public_port: int
    inside: str
    inside_port: int
    expires: float
    snat: str | None = None
    master: FlowKey = NO_KEY  # the control connection's original tuple
    active: bool = True  # the data connection goes towards the client (PORT/EPRT/LPRT)
    form: str = ""  # the announcement's form (PORT, EPSV, ...)

    @property
    def family(self) -> int:
        return 6 if ":" in self.peer else 4

    @property
    def dnat(self) -> bool:
        return (self.public, self.public_port) != (self.inside, self.inside_port)

    def describe(self) -> str:
        s = f"id={self.id} from={self.peer} to={hostport(self.public, self.public_port)}"
        if self.dnat:
            s += f" dnat={hostport(self.inside, self.inside_port)}"
        return s + (f" snat={self.snat}" if self.snat else "")


class Found(NamedTuple):
    """A connection met first at a packet of the server's side (``Kernel.by_reply``)."""

    orig: FlowKey  # its original tuple
    corrected: bool  # the kernel holds a sequence correction for it
    awaiting: bytes = b""  # the passive command whose reply an ftpalg stopped for a restart awaited


class PinholeBusy(Exception):
    """The public port of a pinhole is already expected by another connection."""


class NotForwarded(Exception):
    """The control connection cannot carry pinholes: the kernel gave it no helper, because
    it did not pass this host's prerouting as a new connection. This host opened it itself
    (a client on the gateway, or ``docker-proxy`` relaying one to a container), or it is
    older than ftpalg's rules. ``other``: its tuple in the other direction (the reply tuple
    for ``mapping``, the original for ``by_reply``)."""

    def __init__(self, other: FlowKey) -> None:
        super().__init__("the connection has no conntrack helper")
        self.other = other


class Kernel(Protocol):
    """Conntrack and its expectations, for the core."""

    def mapping(self, key: FlowKey) -> tuple[FlowKey, bool] | None:
        """The reply tuple (src, sport, dst, dport) of the connection whose original tuple
        is ``key``, and whether the kernel holds any sequence correction for it; None if
        conntrack has no such connection. Raise NotForwarded if it cannot carry pinholes."""

    def seq_state(self, key: FlowKey, direction: int) -> KernelAdj:
        """The sequence adjustment the kernel holds for ``direction`` of the connection whose
        original tuple is ``key`` (``KernelAdj()`` if none). Raise if it cannot be read (the
        connection is gone)."""

    def by_reply(self, key: FlowKey) -> Found | None:
        """The connection whose reply tuple is ``key`` (a packet of the server's side met
        before any of the client's); None if conntrack has no such connection. Raise
        NotForwarded if it cannot carry pinholes."""

    def seq_adjust(self, key: FlowKey, direction: int, seq: int, delta: int, known: KernelAdj | None) -> KernelAdj:
        """Add ``delta`` bytes at the segment of ``direction`` (0 = client -> server)
        starting at ``seq`` to the connection's sequence adjustment; return the direction's
        new state. ``known``: the direction's state as this process last left it (then it
        need not be read first), or None. Raise if the kernel cannot carry it."""

    def expect(self, ph: Pinhole) -> None:
        """Let the data connection ``ph`` describes in, once; raise PinholeBusy if its public
        port is expected already, anything else on failure."""

    def follow(self, key: FlowKey, on: bool) -> None:
        """Queue every segment of the connection (``on``), or only the selected ones again
        (the connection's mark in the kernel that the queue rules test)."""

    def hand_over(self, key: FlowKey, awaiting: bytes) -> None:
        """Record in the connection's kernel entry that its client's ``awaiting`` command
        (PASV, EPSV or LPSV) waits for its reply, for the next ftpalg (``Found.awaiting``),
        or forget it (``b""``). Raise on failure."""

    def withdraw(self, ph: Pinhole, used: bool) -> None:
        """Remove ``ph``, and only it (never another pinhole with the same tuple). ``used``:
        its transfer is over, so the kernel has most likely consumed it already (do not wait
        to hear that it was gone). Raise on failure."""
