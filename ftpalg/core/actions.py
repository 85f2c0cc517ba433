"""What the gateway does about one FTP line: the session's ``Decision`` turned into
pinholes, a rewritten line and the kernel's sequence correction — and into events, the
values every report reads (``events.py``).

``Actions`` holds the kernel port, the pinhole book and the outgoing events; it knows
nothing of segments beyond where a line lies in them (``spans``).
"""

from __future__ import annotations

import random
from collections import Counter

from . import ftp, nat64, policy
from .addr import FlowKey, addr_text, hostport
from .events import (
    Close,
    Closing,
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
    Translation,
)
from .flow import C2S, S2C, Flow
from .kernel import Kernel, NotForwarded, Pinhole, PinholeBusy
from .pinholes import PinholeBook
from .policy import Limits, Mapping
from .seqadj import MASK, KernelAdj
from .session import Decision, Session, Transfer

# a pinhole whose tuple the kernel let a new expectation take: used, its removal not read yet
_USED_MEANWHILE = Closing(Close.USED, "used (its port announced again before the kernel's removal was read)")

MAX_LOOKUPS = 3  # NAT mapping look-ups tried per connection before its first announcement
NOT_FORWARDED = ("this host opened the control connection itself (a client on the gateway, or docker-proxy "
                 "relaying one): the kernel gave it no helper, so no pinhole can be opened for it; it passes "
                 "untouched. ftpalg serves forwarded connections (or the connection is older than ftpalg's rules)")

Spans = list[tuple[int, int, int]]  # where a line lies: (segment seq, offset in it, length) per segment


class Actions:
    def __init__(self, kernel: Kernel, book: PinholeBook, flows: dict[FlowKey, tuple[Flow, int]],
                 counters: Counter[str], limits: Limits, pinhole_timeout: float, rng: random.Random,
                 audit: bool) -> None:
        self.kernel = kernel
        self.book = book
        self.flows = flows  # the table's index: a flow is indexed under its reply tuple here
        self.counters = counters  # statistics; decisions leave as events
        self.limits = limits
        self.pinhole_timeout = pinhole_timeout
        self.rng = rng
        self.audit = audit  # whether transfers are reported (TransferDone)
        self.events: list[Event] = []

    # ---- reporting ------------------------------------------------------------------------
    def not_forwarded(self, key: FlowKey) -> None:
        """A control connection (original tuple ``key``) that this host did not forward."""
        self.events.append(Refused(Reason.NOT_FORWARDED, NOT_FORWARDED, key))

    def refuse(self, reason: Reason, detail: str, flow: Flow | None = None, line: bytes | None = None,
               subject: str = "") -> None:
        key = None if flow is None else flow.key
        self.events.append(Refused(reason, detail, key, flow is None or flow.first(reason.value), line, subject))

    # ---- one line -------------------------------------------------------------------------
    def act(self, flow: Flow, d: int, dec: Decision, spans: Spans, line: bytes, now: float) -> bytes:
        """Act on one line; return the line to send. ``spans``: all but the last keep their
        length in a rewrite, the last carries the change."""
        if dec.problem is not None:
            self.refuse(dec.problem[0], dec.problem[1], flow, line)
        if dec.tls is not None:
            self.encrypted(flow, dec.tls)
        if dec.done is not None and self.audit:
            self.events.append(TransferDone(flow.key, self._record(flow, dec.done)))
        if dec.close is not None:
            self.close_pinhole(flow, dec.close)
        new = line if dec.rewrite is None else dec.rewrite  # NAT64: the translated line
        xlat = dec.xlat
        ph = None
        if dec.announce is not None:
            opened = None if flow.closing else self._announce(flow, dec.announce, dec.cmd, new, line, now)
            if opened is not None:
                ph, new = opened
            elif dec.rewrite is not None and d == C2S:  # EPRT/LPRT -> PORT opened nothing:
                new = line  # the client's line goes as it came (the server refuses it)
                flow.session.untranslated(dec.cmd)
        if dec.render is not None:
            new, xlat = self._render(flow, dec.render, dec.cmd, line)
        if ph is not None:
            self.events.append(PinholeOpened(flow.key, ph, line, new))
        if new is line:
            return line
        kept = sum(n for _, _, n in spans[:-1])
        if len(new) < kept:  # shorter than the held part: it cannot keep the held lengths
            self.refuse(Reason.PARTIAL_LINE, "rewritten line shorter than its held part: not rewritten", flow, line)
            return self._unsent(flow, d, dec, line)
        seg_seq = spans[-1][0]
        delta = len(new) - len(line)
        if delta and not self._correct(flow, d, seg_seq, delta, line):
            return self._unsent(flow, d, dec, line)
        at = 0
        adj = flow.dirs[d].adj
        for i, (sseq, off, n) in enumerate(spans):  # one edit per segment: replays stay exact
            piece = new[at:] if i == len(spans) - 1 else new[at : at + n]
            if piece != line[at : at + n]:
                adj.add(sseq + off, n, piece)
            at += n
        self.events.append(LineRewritten(flow.key, d, line, new, xlat))
        return new

    def _unsent(self, flow: Flow, d: int, dec: Decision, line: bytes) -> bytes:
        """The line could not be rewritten: it goes as it came; the pinhole opened for it
        closes, and the session learns that a command it translated went untranslated."""
        if dec.announce is not None:
            self.close_pinhole(flow, Closing(Close.REWRITE_FAILED, "rewrite not possible"))
        if d == C2S and dec.rewrite is not None:
            flow.session.untranslated(dec.cmd)
        return line

    def _correct(self, flow: Flow, d: int, seg_seq: int, delta: int, line: bytes) -> bool:
        """Ask the kernel to carry a length change at ``seg_seq``; whether it does. The
        direction's kernel state, if this process knows it (its own last correction, or what
        it read since), is not read again: any byte of the connection that went by elsewhere
        shows as a gap first, and the resync forgets it (in selected mode, where gaps are the
        rule, it is read, see ``corrected_elsewhere``). Read, it may show this very
        correction already made (``KernelAdj.corrects``): the line is a retransmission of one
        rewritten before, by the other gateway of a pair or before a restart, whose first copy
        may never have reached the peer; it goes out rewritten again and the correction stands
        as it is (added again, the peer's acks would map back short of the line's end)."""
        dr = flow.dirs[d]
        known = dr.kadj
        # Selected mode: the segments between the queued ones are not seen, so bytes that went
        # by elsewhere (the other gateway of a pair) show as no gap: the state is read anyway,
        # and a correction that is not this process's last one makes its history stale.
        read = known is None or flow.session.selected
        try:
            held = known if known is not None and not read else self.kernel.seq_state(flow.key, d)
            if known is not None and held != known:
                self.corrected_elsewhere(flow, d)
                known = None
            if known is None and held.corrects(seg_seq, delta):
                self.counters["seqadj_already_corrected"] += 1
                k = held
            else:
                k = self.kernel.seq_adjust(flow.key, d, seg_seq, delta, held)
        except Exception as e:  # without it the peer would see shifted bytes: no rewrite
            self.refuse(Reason.NO_SEQ_ADJUST, f"kernel sequence adjustment refused: {e}", flow, line)
            self.close_pinhole(flow, Closing(Close.REWRITE_FAILED, "rewrite not possible"))
            return False
        if not read:
            self.counters["seqadj_reads_skipped"] += 1
        if not dr.corrected_by_kernel(k, seg_seq):  # someone else corrected this connection meanwhile
            self.forget_history(flow, d)
        if not dr.adj.edits:  # what the kernel already shifts this direction by
            dr.adj.base = k.before if k.pos == seg_seq & MASK else k.after
        dr.kadj = k
        return True

    def _announce(self, flow: Flow, hp: ftp.HostPort, cmd: int, line: bytes, orig: bytes,
                  now: float) -> tuple[Pinhole, bytes] | None:
        """Open the pinhole an accepted announcement (in ``line``, ``orig`` as it came, before
        any translation) asks for; the pinhole and the line to send, or None: nothing opened."""
        if flow.passing is not None:
            return None  # said already (learn_mapping)
        if flow.mapping is None and not self.learn_mapping(flow, force=True):
            if flow.passing is not None:
                return None
            self.refuse(Reason.NO_NAT_MAPPING, "conntrack has no entry for the control connection", flow, orig)
            return None
        m = flow.mapping
        assert m is not None
        why = policy.refuse_reason(hp, m, self.limits)
        if why:
            self.refuse(Reason.REFUSED, why, flow, orig, f"{hp.form.name} {hp.addr or ''}:{hp.port}")
            return None
        book = self.book
        if book.full() and not self._make_room(m.client):
            self.refuse(Reason.PINHOLE_CAP, f"{len(book)} pinholes open (--max-pinholes): {hp.form.name} opens "
                                            "nothing", flow, orig)
            return None
        if book.client_full(m.client):
            self.refuse(Reason.CLIENT_PINHOLE_CAP, f"client {m.client} has {book.per_client[m.client]} pinholes "
                                                   f"open (--max-pinholes-per-client): {hp.form.name} opens nothing",
                        flow, orig)
            return None
        p = policy.plan(hp, m)
        ph = self._open(flow, hp, p, orig, now)
        if ph is None:
            return None
        flow.pinhole = flow.last_pinhole = ph
        flow.session.opened(cmd)
        book.book(ph, m.client)
        same = ph.public_port == hp.port and (p.announce_addr is None or p.announce_addr == hp.addr)
        return ph, line if same else ftp.rewrite_line(line, hp, p.announce_addr, ph.public_port)

    def _render(self, flow: Flow, form: ftp.Form, cmd: int, line: bytes) -> tuple[bytes, Translation]:
        """NAT64: the server's 227 as the client's EPSV (229) or LPSV (228) expects it, for
        the pinhole it opened; 425 when it opened none (RFC 6384: a 227 naming another
        address than the server's may be refused so)."""
        end = ftp.line_end(line)
        ph = flow.pinhole
        x = flow.session.xlat
        if ph is None or flow.session.live != cmd:
            return b"425 Can't open data connection: the server's passive address was refused" + end, \
                Translation.REFUSED
        addr = nat64.embed(x.prefix, ph.public) if form is ftp.Form.LPSV and x is not None and x.prefix else None
        return ftp.passive_reply(form, ph.public_port, addr, end), Translation.REPLY

    def _open(self, flow: Flow, hp: ftp.HostPort, p: policy.Plan, line: bytes, now: float) -> Pinhole | None:
        """Expect the data connection at the announced port, or at a free one.

        A port the book still holds for another control connection is asked of the kernel
        all the same: the book learns that a pinhole was used only when the kernel's removal
        is read (selected mode), and the server announces the port again as soon as it
        accepted that data connection, often before. If the kernel takes the new
        expectation, the old one is gone there: it is closed as used. Moving to another
        public port instead loses the transfer when the client's data connection comes from
        a port it used with the announced one less than TIME_WAIT (120 s) before: both
        connections have the same reply tuple (inside server:port -> client:port), the
        kernel cannot confirm the second and drops its SYN, having consumed the expectation
        (docs/performance.md)."""
        for port in policy.candidate_ports(p.want_port, self.rng):
            held = self.book.promised.get((p.peer, p.public, port))
            ph = Pinhole(self.book.next_id, p.peer, p.public, port, p.inside, p.inside_port,
                         now + self.pinhole_timeout, p.snat, flow.key, not hp.form.is_reply, hp.form.name)
            try:
                self.kernel.expect(ph)
            except PinholeBusy:  # expected by a connection this process does not know of
                if held is None:
                    self.counters["pinhole_port_busy"] += 1
                continue
            except Exception as e:  # the kernel's failure must not take the packet with it
                self.refuse(Reason.PINHOLE_FAILED, f"{ph.describe()}: {e}", flow, line)
                return None
            if held is not None:
                self._used_meanwhile(held)
            return ph
        self.refuse(Reason.NO_FREE_PORT, f"no free public port for {p.want_port} in {policy.PORT_TRIES} tries",
                    flow, line)
        return None

    def _used_meanwhile(self, held: Pinhole) -> None:
        """The kernel took a new expectation of ``held``'s tuple: ``held`` is not expected
        there any more (its data connection used it; its removal is still to be read)."""
        hit = self.flows.get(held.master)
        if hit is not None and hit[0].pinhole is held:
            self.close_pinhole(hit[0], _USED_MEANWHILE)
        else:  # not a live pinhole of a tracked connection: only the book's entry is left
            self.book.unbook(held)

    def _make_room(self, client: str) -> bool:
        victim = self.book.victim(client)
        hit = self.flows.get(victim.master) if victim is not None else None
        if hit is None or hit[0].pinhole is not victim:
            return False
        self.close_pinhole(hit[0], Closing(Close.PREEMPTED, "pinhole cap: room made for a client holding fewer"))
        return True

    def _record(self, flow: Flow, t: Transfer) -> dict[str, object]:
        """One audit record: who transferred what, how, with which outcome."""
        ph = flow.pinhole or flow.last_pinhole
        c, cport, pub, pport = flow.key
        srv = flow.reply_key or flow.key[2:] + flow.key[:2]  # the server's real address, if known
        rec: dict[str, object] = {
            "client": hostport(addr_text(c), cport),
            "server": hostport(addr_text(srv[0]), srv[1]),
            "user": flow.session.user.decode("utf-8", "replace"),
            "command": t.verb.decode("ascii", "replace"),
            "path": t.arg.decode("utf-8", "replace"),
            "mode": ph.form if ph else "",
            "data": (f"{ph.peer} -> {hostport(ph.public, ph.public_port)}"
                     + (f" -> {hostport(ph.inside, ph.inside_port)}" if ph.dnat else "")) if ph else "",
            "code": t.code,
            "reply": t.text.decode("utf-8", "replace"),
            "outcome": "ok" if 200 <= t.code < 300 else "failed",
        }
        if srv[:2] != (pub, pport):
            rec["server_public"] = hostport(addr_text(pub), pport)
        x = flow.session.xlat
        if x is not None:  # an IPv6 client behind the NAT64 translator: ``client`` is its pool address
            rec["nat64"] = {"client6": x.client6 or None, "translated": x.enabled}
        return rec

    # ---- the connection's state -------------------------------------------------------------
    def learn_mapping(self, flow: Flow, force: bool = False) -> bool:
        """Ask conntrack for the control connection's reply tuple (a few tries per flow,
        unless ``force``); index the flow under it for server -> client packets."""
        if flow.lookups >= MAX_LOOKUPS and not force:
            return False
        flow.lookups += 1
        self.counters["nat_lookups"] += 1
        try:
            found = self.kernel.mapping(flow.key)
        except NotForwarded as e:
            flow.passing = e.other  # the table lets it pass from now on
            self.not_forwarded(flow.key)
            return False
        if found is None:
            return False
        self.index_reply(flow, *found)
        return True

    def index_reply(self, flow: Flow, reply: FlowKey, corrected: bool) -> None:
        """The NAT mapping is known: the flow is found by the server's packets too."""
        a, b = flow.dirs
        if not corrected and a.kadj is None and b.kadj is None:
            # the kernel holds no correction for it: nothing to read before the first one
            a.kadj, b.kadj = KernelAdj(), KernelAdj()
        flow.reply_key = reply
        flow.mapping = Mapping.from_tuples(flow.key, reply)
        self.flows[reply] = (flow, S2C)

    def close_pinhole(self, flow: Flow, closing: Closing, withdraw: bool = True) -> None:
        """Close the live pinhole; ``withdraw``: remove it from the kernel (unless the kernel
        told us it is gone)."""
        ph = flow.pinhole
        if ph is None:
            return
        flow.pinhole = None
        flow.session.closed()
        self.book.unbook(ph)
        try:
            if withdraw:
                self.kernel.withdraw(ph, closing.why is Close.USED)
        except Exception as e:
            self.refuse(Reason.PINHOLE_CLOSE_FAILED, f"{ph.describe()}: {e}", flow)
        self.events.append(PinholeClosed(flow.key, ph, closing.why, closing.text))

    def forget_history(self, flow: Flow, d: int) -> None:
        flow.dirs[d].forget_history()
        self.counters["resync"] += 1

    def corrected_elsewhere(self, flow: Flow, d: int) -> None:
        """Selected mode: the kernel's correction of direction ``d`` is not the one this
        process left, so the connection's bytes went by elsewhere meanwhile (the other
        gateway of a pair rewrote a line): its edit history is stale. The session goes on
        (it does not depend on the lines it did not see)."""
        self.forget_history(flow, d)
        self.events.append(Resynced(flow.key, "the kernel's sequence correction changed elsewhere (the other gateway "
                                              "of a pair); history dropped", flow.first("resync")))

    def resync(self, flow: Flow, why: str) -> None:
        """Bytes of this connection went by without us (through another gateway of a
        failover pair, or while this process was not there): what we remember of it, edits
        and commands alike, is stale. Start over as for a connection picked up mid-stream;
        the kernel's corrections stand."""
        self.close_pinhole(flow, Closing(Close.RESYNC, why))
        for d in (C2S, S2C):
            self.forget_history(flow, d)
        encrypted = flow.session.encrypted
        old = flow.session
        flow.session = Session(old.selected, old.xlat.fresh() if old.xlat is not None else None)
        flow.session.encrypted = encrypted  # TLS stays TLS
        self.events.append(Resynced(flow.key, why + "; history dropped, picked up again", flow.first("resync")))

    def encrypted(self, flow: Flow, detail: str) -> None:
        self.events.append(Encrypted(flow.key, detail))

    def follow(self, flow: Flow) -> None:
        """Selected mode: tell the kernel whether to queue the whole stream of ``flow``."""
        want = flow.wants_whole_stream
        if want == flow.following:
            return
        try:
            self.kernel.follow(flow.key, want)
            flow.following = want
        except Exception as e:  # then only the selected segments come: a split line may pass unread
            self.refuse(Reason.FOLLOW_FAILED, f"kernel label not {'set' if want else 'cleared'}: {e}", flow)

    def hand_over(self, flow: Flow, awaiting: bytes) -> None:
        """Record (or, with b"", forget) in the kernel the passive command ``flow`` awaits
        the reply to, across a restart (``Alg.hand_over``)."""
        try:
            self.kernel.hand_over(flow.key, awaiting)
        except Exception as e:  # then the next ftpalg takes the reply as unsolicited: one transfer fails
            self.refuse(Reason.HANDOVER_FAILED, f"kernel label not {'set' if awaiting else 'cleared'}: {e}", flow)

    def evicted(self, count: int) -> None:
        self.events.append(FlowsEvicted(count, self.limits.max_flows))
