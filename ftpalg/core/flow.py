"""One FTP control connection: its key, its NAT mapping, its two directions, its FTP
session and its live pinhole. A record with a few questions; the work is done by the
walk (``walk.py``), the decisions by ``actions.py``, the bookkeeping by ``alg.py``.

Directions: 0 = client -> server (the connection's original direction, towards the control
port), 1 = server -> client. Keys are the (src, sport, dst, dport) of packets as the hook
sees them; the hook sits after conntrack but before NAT (mangle PREROUTING), so a packet of
either direction carries the addresses of its side of the gateway: the client's packets are
found by the original tuple, the server's by the reply tuple of the NAT mapping.
"""

from __future__ import annotations

from .addr import FlowKey
from .direction import Direction
from .kernel import Pinhole
from .nat64 import Xlat
from .policy import Mapping
from .session import Session

C2S, S2C = 0, 1


class Flow:
    __slots__ = ("key", "reply_key", "mapping", "dirs", "session", "pinhole", "last_pinhole", "closed_at",
                 "last_seen", "logged", "lookups", "following", "passing")

    def __init__(self, key: FlowKey, now: float, selected: bool = False, xlat: Xlat | None = None) -> None:
        self.key = key
        self.reply_key: FlowKey | None = None  # the server's side, once conntrack told
        self.mapping: Mapping | None = None
        self.dirs = (Direction(), Direction())
        self.session = Session(selected, xlat)  # xlat: NAT64 state, for a translated connection
        self.pinhole: Pinhole | None = None  # the live one
        self.last_pinhole: Pinhole | None = None  # the latest opened, open or not (audit)
        self.closed_at: float | None = None  # both FINs, or a RST
        self.last_seen = now
        self.logged: tuple[str, ...] = ()  # reasons reported for it (a few; an empty set is 216 bytes)
        self.lookups = 0  # NAT mapping look-ups tried
        self.following = False  # the kernel was asked to queue its whole stream (selected mode)
        # not forwarded by this host (kernel.NotForwarded): its reply tuple; the table lets
        # its packets pass untouched from now on
        self.passing: FlowKey | None = None

    @property
    def corrected(self) -> bool:
        """Whether lines of this connection were rewritten (the kernel corrects seq/ack)."""
        return self.dirs[0].adj.active or self.dirs[1].adj.active

    @property
    def closing(self) -> bool:
        return self.closed_at is not None or self.dirs[0].fin or self.dirs[1].fin

    @property
    def waiting(self) -> bool:
        """Whether segments of it wait (held or kept ahead)."""
        a, b = self.dirs
        return bool(a.held or a.ahead or b.held or b.ahead)

    @property
    def wants_whole_stream(self) -> bool:
        """Selected mode: whether the kernel must queue every segment of it for now — a line
        is held for its rest, a multi-line passive reply is open without its address yet, or
        (NAT64) a reply ftpalg replaces is still to come — the reply to a NOOP standing for a
        command it answers — or one it translates is open: all its lines are rewritten (their
        next segments may carry no word the kernel selects by)."""
        s = self.session
        return (bool(self.dirs[0].held or self.dirs[1].held)
                or (s.reply_code in (227, 228, 229) and not s.reply_found and not s.encrypted)
                or (s.xlat is not None and not s.encrypted and (s.xlat.owed or (s.reply_code != 0
                                                                               and s.reply_sub is not None))))

    def first(self, reason: str) -> bool:
        """Whether ``reason`` is news for this connection (reported once per connection)."""
        if reason in self.logged:
            return False
        self.logged += (reason,)
        return True
