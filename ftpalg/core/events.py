"""What the core decided, as values: the verdict of each packet, and the events that the
caller drains after it (``Alg.drain``).

Everything that reports on the core reads these and nothing else: the counters and log
lines (``accounting.Accounting``), the audit log (``TransferDone``), the metrics (the
counters), ``ftpalg explain`` (which pinhole an announcement opened, which line went out,
why one was refused). No branch anywhere depends on the text of a message: texts are
details for people, the enums are what code tests.

A verdict is one of four singletons or small values: ``PASS`` (send the packet unchanged),
``HELD`` (the packet waits; its verdict comes back later through ``Alg.take_released``),
``Drop(reason)`` (TCP will resend), ``Replace(packet)`` (send these bytes instead).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .addr import FlowKey
from .kernel import Pinhole


class Reason(StrEnum):
    """Why a packet, line or connection was not acted on (or not as asked). The value is
    the counter's name and the metrics' ``reason`` label: this is the one list of them."""

    # an announcement (PORT/EPRT/LPRT, 227/228/229) that opened nothing or was not rewritten
    REFUSED = "refused"  # policy: bounce, foreign address, port below --min-port
    UNSOLICITED = "unsolicited"  # a 227/228/229 that answers no PASV/EPSV/LPSV, or sent by the client
    MALFORMED = "malformed"
    PARTIAL_LINE = "partial_line"  # split across segments and not put together
    NO_NAT_MAPPING = "no_nat_mapping"
    NO_FREE_PORT = "no_free_port"
    PINHOLE_FAILED = "pinhole_failed"
    # a control connection this host did not forward: opened on the gateway itself (a client
    # there, docker-proxy); it passes untouched, no pinhole can be opened for it
    NOT_FORWARDED = "not_forwarded"
    NO_SEQ_ADJUST = "no_seq_adjust"
    PINHOLE_CAP = "pinhole_cap"
    CLIENT_PINHOLE_CAP = "client_pinhole_cap"
    GAP = "gap"  # bytes before a segment were not seen: its lines were not read
    # packets
    TRUNCATED = "truncated"
    UNDECODABLE = "undecodable"
    DROPPED_UNREPLAYABLE = "dropped_unreplayable"
    DROPPED_TRUNCATED = "dropped_truncated"
    DROPPED_UNEXPRESSIBLE = "dropped_unexpressible"
    ENCODE_FAILED = "encode_failed"
    SYN_MID_STREAM = "syn_mid_stream"
    SYN_DATA = "syn_data"
    # the gateway's own limits and faults
    FLOW_CAP = "flow_cap"
    HELD_CAP = "held_cap"
    AUDIT_FAILED = "audit_failed"
    PINHOLE_CLOSE_FAILED = "pinhole_close_failed"
    FOLLOW_FAILED = "follow_failed"  # the kernel's mark for queueing a whole stream not changed
    HANDOVER_FAILED = "handover_failed"  # the passive command awaited not left in the kernel for the next ftpalg
    # NAT64 (RFC 6384): the server answered the NOOP that stood for a command ftpalg answers
    # itself (EPSV ALL, EPSV <n>, ALGS) with an error; its reply went to the client as the answer
    NOOP_REFUSED = "noop_refused"


# What the metric ftpalg_refusals exports, by reason (its label set, unchanged since issue 7).
REFUSALS: tuple[Reason, ...] = tuple(r for r in Reason if r not in (Reason.SYN_MID_STREAM, Reason.SYN_DATA))
# The reasons that concern one announcement: what ``explain`` says the core did with it.
ANNOUNCEMENT_PROBLEMS: tuple[Reason, ...] = (
    Reason.REFUSED, Reason.UNSOLICITED, Reason.MALFORMED, Reason.PARTIAL_LINE, Reason.NO_NAT_MAPPING,
    Reason.NO_FREE_PORT, Reason.PINHOLE_FAILED, Reason.NO_SEQ_ADJUST, Reason.PINHOLE_CAP,
    Reason.CLIENT_PINHOLE_CAP, Reason.GAP)


class Translation(StrEnum):
    """What a NAT64 translation (RFC 6384) did to a line: the kind of a ``LineRewritten``
    (and the counter ``nat64_<value>``)."""

    EPSV = "epsv"  # EPSV / EPSV 2 -> PASV toward the server
    LPSV = "lpsv"  # LPSV -> PASV
    EPRT = "eprt"  # EPRT |2| -> PORT with the client's IPv4-side address
    LPRT = "lprt"  # LPRT 6,... -> PORT
    REPLY = "reply"  # the server's 227 -> 229 (or 228) toward the client
    REFUSED = "refused"  # the server's 227 opened nothing: 425 toward the client
    NOOP = "noop"  # a command ftpalg answers itself (EPSV ALL, EPSV <n>, ALGS) -> NOOP toward the server
    ANSWERED = "answered"  # the server's reply to that NOOP -> ftpalg's answer
    REMOVED = "removed"  # a line of a translated multi-line reply, left out


class Close(StrEnum):
    """Why a pinhole was closed (withdrawn from the kernel)."""

    USED = "used"  # a transfer command after it got its final reply: the kernel most likely consumed it
    REPLACED = "replaced"  # a new announcement of the same session
    SERVER_REFUSED = "server_refused"  # the server refused the PORT/EPRT/LPRT that announced it
    ENCRYPTED = "encrypted"  # AUTH: the session went TLS
    EXPIRED = "expired"  # not used within --pinhole-timeout
    PREEMPTED = "preempted"  # the pinhole cap: room made for a client holding fewer
    REWRITE_FAILED = "rewrite_failed"  # opened, but its line could not be rewritten
    RESYNC = "resync"  # bytes of the connection passed elsewhere: what it was for is stale
    CONTROL_CLOSING = "control_closing"  # FIN
    CONTROL_RESET = "control_reset"  # RST
    ENDED = "ended"  # the connection was forgotten (closed, idle, evicted, reused, shutdown)


@dataclass(frozen=True, slots=True)
class Closing:
    """A decision to close the live pinhole: why, and the words for people."""

    why: Close
    text: str

    def __str__(self) -> str:
        return self.text


# ---- verdicts -----------------------------------------------------------------------------------


class Pass:
    """Send the packet unchanged."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PASS"


class Held:
    """The packet's verdict waits: the caller keeps it (its token) until the core hands
    it back through ``take_released``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HELD"


class DropWhy(StrEnum):
    DUPLICATE = "duplicate"  # a copy of a segment held or kept ahead: the original goes
    UNREPLAYABLE = "unreplayable"  # a retransmission starting inside a rewritten line
    TRUNCATED = "truncated"  # a copy too short to rewrite, on a corrected connection
    UNEXPRESSIBLE = "unexpressible"  # no seq lands it where it belongs after the kernel's correction
    REWOUND = "rewound"  # a line's first part that waited in vain: the sender resends it whole


@dataclass(frozen=True, slots=True)
class Drop:
    """Drop the packet: TCP resends it (or the receiver already has its bytes)."""

    why: DropWhy


@dataclass(frozen=True, slots=True)
class Replace:
    """Send ``packet`` instead (rewritten payload, or a corrected seq)."""

    packet: bytes


PASS = Pass()
HELD = Held()
DROPS = {w: Drop(w) for w in DropWhy}  # one value each: the walk hands these out, never builds one
Verdict = Pass | Held | Drop | Replace

# ---- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refused:
    """A packet, line or connection not acted on, and why. ``first``: the first time for
    this reason on this connection (logs say it once per connection); ``line``: the line
    concerned, when there is one; ``subject``: what was refused, in words (the announced
    form and address: ``PORT 10.0.0.2:50000``), when ``detail`` says only why."""

    reason: Reason
    detail: str
    flow: FlowKey | None = None
    first: bool = True
    line: bytes | None = None
    subject: str = ""

    def text(self) -> str:
        return f"{self.subject}: {self.detail}" if self.subject else self.detail


@dataclass(frozen=True, slots=True)
class PinholeOpened:
    """An announcement accepted: ``pinhole`` is expected by the kernel; ``line`` is the
    announcing line as it came, ``sent`` as the core decided to send it."""

    flow: FlowKey
    pinhole: Pinhole
    line: bytes
    sent: bytes


@dataclass(frozen=True, slots=True)
class PinholeClosed:
    flow: FlowKey
    pinhole: Pinhole
    why: Close
    detail: str


@dataclass(frozen=True, slots=True)
class LineRewritten:
    """A line went out changed (its length change, if any, is with the kernel); ``xlat``:
    by a NAT64 translation, which (None: an address rewritten for NAT)."""

    flow: FlowKey
    direction: int
    old: bytes
    new: bytes
    xlat: Translation | None = None


@dataclass(frozen=True, slots=True)
class TransferDone:
    """A transfer command got its final reply: one audit record."""

    flow: FlowKey
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Encrypted:
    """The control connection went TLS (AUTH answered 234, or a TLS record seen)."""

    flow: FlowKey
    detail: str


@dataclass(frozen=True, slots=True)
class Resynced:
    """Bytes of the connection passed elsewhere: its history was dropped and it is
    followed again as if picked up mid-stream (the kernel's corrections stand)."""

    flow: FlowKey
    why: str
    first: bool = True


@dataclass(frozen=True, slots=True)
class FlowsEvicted:
    """At the flow cap, the least recently seen connections were forgotten."""

    count: int
    cap: int


Event = Refused | PinholeOpened | PinholeClosed | LineRewritten | TransferDone | Encrypted | Resynced | FlowsEvicted
