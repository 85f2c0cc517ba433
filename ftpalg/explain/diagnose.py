"""Diagnosis: the announcements (PORT/EPRT/LPRT/227/228/229) of each session with the core's
decision, the replies to them, the data connections they led to (to the announced port or
the one it would be rewritten to, from the right side, after it and before the next one),
a diagnosis per failed transfer and a verdict per session and for the whole capture.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import ftp
from ..core.addr import hostport
from ..core.events import ANNOUNCEMENT_PROBLEMS, Encrypted, LineRewritten, PinholeOpened, Refused
from ..core.kernel import Pinhole
from ..core.session import TRANSFER_VERBS
from .connections import Announcement, DataConn, Line, Session, line_text
from .nat import is_private, show
from .replay import FrameResult

# ---- announcements, replies, transfers ---------------------------------------------------------


def analyse(s: Session, results: dict[int, FrameResult], data: list[DataConn]) -> None:
    """Announcements with the core's decision, the replies to them, the data connections
    they led to, and a diagnosis per failed transfer."""
    m = s.mapping
    assert m is not None
    cmds: list[tuple[Line, int]] = []  # pending commands with their index
    count = 0
    last_ann: Announcement | None = None
    multi: tuple[int, list[Line]] | None = None
    for ln in s.lines:
        if ln.d == 0:
            count += 1
            cmds.append((ln, count))
            verb = ftp.command_verb(ln.text)
            if verb == b"USER" and s.user is None:
                s.user = line_text(ln.text)[5:].strip() or None
            if verb in (b"PORT", b"EPRT", b"LPRT"):
                try:
                    hp = ftp.parse_hostport(ln.text)
                except ftp.ParseError as e:
                    s.notes.append(f"packet {ln.frame}: {line_text(ln.text)!r} is malformed ({e}): ftpalg "
                                   "opens nothing for it")
                    continue
                if hp is not None:
                    last_ann = Announcement(ln, hp, count)
                    s.announcements.append(last_ann)
                    _core_decision(last_ann, s, results.get(ln.frame))
            continue
        r = ftp.parse_reply(ln.text)
        if multi is not None:
            multi[1].append(ln)
            if not (r is not None and r.code == multi[0] and r.final):
                continue
            code, body = multi[0], multi[1]
            multi = None
        elif r is None:
            continue
        elif not r.final:
            multi = (r.code, [ln])
            continue
        else:
            code, body = r.code, [ln]
        if code in (227, 228, 229):
            asked = cmds[0] if cmds else None
            for b in body:
                try:
                    hp = ftp.parse_passive_reply(b.text, code)
                except ftp.ParseError as e:
                    s.notes.append(f"packet {b.frame}: {line_text(b.text)!r} is malformed ({e}): ftpalg "
                                   "opens nothing for it")
                    break
                if hp is not None:
                    last_ann = Announcement(b, hp, asked[1] if asked else 0)
                    s.announcements.append(last_ann)
                    _core_decision(last_ann, s, results.get(b.frame))
                    break
        if code < 200 or not cmds:
            continue
        cmd, n = cmds.pop(0)
        verb = ftp.command_verb(cmd.text)
        text = " ".join(line_text(b.text) for b in body)
        if verb in (b"PORT", b"EPRT", b"LPRT"):
            for a in s.announcements:
                if a.cmd_index == n and a.active:
                    a.reply = (code, text)
        if verb in TRANSFER_VERBS:
            s.transfers.append((cmd, code, text))
            if last_ann is not None and last_ann.transfer is None and last_ann.cmd_index < n:
                last_ann.transfer = (line_text(cmd.text), code, text)
    for cmd, n in cmds:  # never answered
        if ftp.command_verb(cmd.text) in TRANSFER_VERBS:
            s.transfers.append((cmd, None, ""))
            if last_ann is not None and last_ann.transfer is None and last_ann.cmd_index < n:
                last_ann.transfer = (line_text(cmd.text), None, "")
    _match_data(s, data)
    for a in s.announcements:
        _diagnose(a, s)
    _translations(s, results)
    _session_verdict(s, data)


def _translations(s: Session, results: dict[int, FrameResult]) -> None:
    """NAT64 (RFC 6384): what the core translated for an IPv6 client, as notes."""
    for no in s.frames:
        res = results.get(no)
        for ev in res.events if res is not None else ():
            if isinstance(ev, LineRewritten) and ev.xlat is not None:
                new = line_text(ev.new) if ev.new else "(left out)"
                s.notes.append(f"packet {no}: NAT64 translation ({ev.xlat}): {line_text(ev.old)} -> {new}")


# ---- the core's decision (the one reader of replay.FrameResult) --------------------------------


def _core_decision(a: Announcement, s: Session, res: FrameResult | None) -> None:
    """What the core decided for the announcement's line (at the frame that completed it),
    read from its events."""
    if res is None:
        a.action, a.detail = "unseen", "the core did not see this line"
        return
    opened = [ev for ev in res.events if isinstance(ev, PinholeOpened)]
    if opened:
        ph = opened[-1].pinhole
        a.pinhole = ph
        sent = next((ev.new for ev in res.events if isinstance(ev, LineRewritten) and ev.old == opened[-1].line),
                    None)
        if sent is not None:
            a.action, a.rewritten = "rewrite", sent
            a.detail = f"rewrite to {show(hostport(ph.public, ph.public_port), s)} and open a pinhole"
        else:
            a.action = "open"
            a.detail = "leave it unchanged and open a pinhole"
        a.detail += f": {show(pinhole_text(ph), s)}"
        return
    refused = {ev.reason: ev for ev in res.events if isinstance(ev, Refused)}
    for reason in ANNOUNCEMENT_PROBLEMS:
        if reason in refused:
            a.action, a.detail = reason.value, refused[reason].detail
            return
    if any(isinstance(ev, Encrypted) for ev in res.events):
        a.action, a.detail = "encrypted", "the control connection is encrypted"
        return
    a.action, a.detail = "nothing", "no pinhole, no rewrite"


def pinhole_text(ph: Pinhole) -> str:
    s = f"{ph.peer} (any port) may connect to {hostport(ph.public, ph.public_port)}"
    if ph.dnat:
        s += f", sent on to {hostport(ph.inside, ph.inside_port)}"
    if ph.snat:
        s += f", leaving from {ph.snat}"
    return s + ", once"


# ---- data connections, diagnoses, verdicts ------------------------------------------------------


def _match_data(s: Session, data: list[DataConn]) -> None:
    """Data connections of each announcement: to its port (or the port it would be
    rewritten to), from the right side, after it and before the next one."""
    m = s.mapping
    assert m is not None
    anns = s.announcements
    ends = [a.line.t for a in anns[1:]] + [s.t1 + 5.0] if anns else []
    client_side = {s.client, m.client, m.client_seen}
    server_side = {s.server, m.server, m.public}
    for a, end in zip(anns, ends, strict=True):
        ports = {a.hp.port} | ({a.pinhole.public_port} if a.pinhole else set())
        for c in data:
            if c.matched or c.t0 < a.line.t - 0.001 or c.t0 > end or c.bport not in ports:
                continue
            if a.active and not (c.a in server_side or c.b in client_side or c.b == a.hp.addr):
                continue
            if not a.active and not (c.a in client_side or c.b in server_side or c.b == a.hp.addr):
                continue
            c.matched = True
            a.data.append(c)


def _short_fix(a: Announcement, s: Session) -> str:
    """What ftpalg would do, in a few words, for a diagnosis."""
    ph = a.pinhole
    if ph is None:
        if "--min-port" in a.detail:
            return f"port {a.hp.port} refused by policy (--min-port): ftpalg opens nothing for it ({a.detail})"
        return f"ftpalg would not help: {a.action} ({a.detail})"
    to = show(hostport(ph.public, ph.public_port), s)
    if a.action == "rewrite":
        return f"ftpalg would rewrite it to {to} and open a pinhole for {ph.peer}"
    return f"ftpalg would open a pinhole for {ph.peer} to {to}" + (
        f", sent on to {hostport(ph.inside, ph.inside_port)}" if ph.dnat else "")


def _diagnose(a: Announcement, s: Session) -> None:
    m = s.mapping
    assert m is not None
    hp = a.hp
    name = "227" if hp.form is ftp.Form.PASV else hp.form.value
    what = f"{name} names {hostport(hp.addr, hp.port) if hp.addr else f'port {hp.port}'}"
    ok_data = [c for c in a.data if c.status == "ok"]
    tr = a.transfer
    tr_ok = tr is not None and tr[1] is not None and 200 <= tr[1] < 300
    refused_by_server = a.active and a.reply is not None and a.reply[0] >= 400
    a.ok = bool(ok_data) and (tr is None or tr_ok) and not refused_by_server
    private = hp.addr is not None and is_private(hp.addr)
    nat = m.client != m.client_seen if a.active else m.public != m.server
    if a.ok:
        extra = ""
        if private and nat:
            extra = " (the address is private: a gateway translated it and let the connection through, as an " \
                    "FTP ALG such as ftpalg does)"
        a.diagnosis = f"{what}: the data connection worked{extra}" + (f", {tr[0]} answered {tr[1]}" if tr else "")
        return
    problem = []
    tags = a.problems
    if private:
        tags.append("private_address")
    if a.action not in ("rewrite", "open"):
        tags.append("min_port" if "--min-port" in a.detail else f"ftpalg_{a.action}")
    if refused_by_server:
        tags.append("server_refused_announcement")
    if a.active:
        if private and hp.addr != s.client:  # captured outside the client's gateway
            problem.append(f"{what}, a private address: the server ({s.server}) cannot reach it")
        elif private and nat:
            problem.append(f"{what}, a private address: the server ({m.server}) cannot reach it (it sees the "
                           f"client as {show(m.client_seen, s)})")
        else:
            problem.append(what)
        if refused_by_server:
            problem.append(f"the server refused it ({a.reply[1] if a.reply else ''})")
    else:
        if private and hp.addr != s.server and any(c.b != hp.addr for c in a.data):
            problem.append(f"{what} (private): the client ({s.client}) ignored that unreachable address and "
                           "connected to the control connection's address instead")
        elif private and hp.addr != s.server:  # captured outside the server's gateway
            problem.append(f"{what} (private): the client ({s.client}) connects to an unreachable address")
        elif private and nat:
            problem.append(f"{what} (private): a client outside cannot reach it (it knows the server as "
                           f"{show(m.public, s)})")
        elif nat and hp.addr is None:
            problem.append(f"{what} of the server behind the gateway ({m.server})" + (
                "" if a.data else f": the gateway forwards only the control port, not {show(m.public, s)}:{hp.port}"))
        else:
            problem.append(what)
    for c in a.data:
        why = c.describe()
        if c.status == "refused" and not a.active and nat and c.b == m.public:
            why += f": the gateway does not forward port {c.bport} to the server ({m.server})"
        elif c.status == "refused" and a.active and nat and c.b == m.client_seen:
            why += f": the gateway does not forward port {c.bport} to the client ({m.client})"
        elif c.status in ("unanswered", "unreachable"):
            why += ": the address is unreachable or a firewall drops it"
        problem.append(f"data connection {why}")
        tags.append(f"data_{c.status}")
    if not a.data and not refused_by_server:
        tags.append("no_data_connection")
        behind = (s.client != m.client_seen or s.client == m.client) if a.active else s.server == m.server
        if a.active:
            problem.append("no data connection from the server seen in this capture" if behind else
                           "no data connection from the server reached this side of the gateway")
        elif private and hp.addr != s.server:
            problem.append("no data connection attempt seen in this capture (data SYN never sent: the client's "
                           "connect failed before it left, e.g. 'Network is unreachable', or went elsewhere)")
        elif nat and s.server == m.server:  # captured between the gateway and the server
            problem.append("no data connection reached this side of the gateway")
        else:
            problem.append("no data connection attempt seen in this capture")
    if tr is not None:
        if tr[1] is None:
            problem.append(f"{tr[0]} got no final reply in the capture")
        elif tr[1] == 425:
            problem.append(f"server answered {tr[2]}")
            tags.append("reply_425")
        elif not tr_ok:
            problem.append(f"{tr[0]} answered {tr[2]}")
    gw = "the gateway needs an FTP ALG: " if a.pinhole is not None and (private or nat or a.data) else ""
    a.diagnosis = "; ".join(problem) + f" — {gw}{_short_fix(a, s)}"


def _session_verdict(s: Session, data: list[DataConn]) -> None:
    failed = [a for a in s.announcements if not a.ok]
    if s.encrypted_at is not None:
        s.verdict = "encrypted"
        s.diagnosis.append(f"AUTH TLS: control channel encrypted after packet {s.encrypted_at} — nothing can be said "
                           "about transfers (ftpalg cannot read or rewrite an encrypted PORT/227/229 either: through "
                           "NAT, FTPS needs the server's passive range forwarded and its public address configured)")
    for a in failed:
        s.diagnosis.append(a.diagnosis)
    bad_transfers = [t for t in s.transfers if t[1] is None or not 200 <= t[1] < 300]
    if failed or (bad_transfers and s.encrypted_at is None):
        s.verdict = "failed"
    if s.encrypted_at is None and not s.announcements and bad_transfers:
        s.diagnosis.append("transfers failed without any PORT/EPRT/LPRT/227/228/229 in the capture")
    if s.verdict == "ok":
        n = sum(1 for a in s.announcements if a.ok)
        s.diagnosis.append(f"nothing wrong: {n} data connection{'s' if n != 1 else ''} worked"
                           if n else "nothing wrong (no transfer in this session)")


# ---- the whole capture ------------------------------------------------------------------------


@dataclass
class Report:
    """The explained capture: every control connection and every other TCP connection."""

    path: str
    frames: int
    sessions: list[Session]
    data: list[DataConn]

    @property
    def failed(self) -> bool:
        return any(s.verdict == "failed" for s in self.sessions)
