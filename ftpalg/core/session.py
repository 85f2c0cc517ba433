"""The FTP session of one control connection, as a state machine of commands and replies.

Lines in, ``Decision``s out; nothing here knows TCP, sequence numbers, addresses of the
connection or the firewall. The rules:

1. Commands come only from the client side, replies only from the server side; the caller
   feeds each whole line of its direction (``command`` / ``reply``).
2. Every command gets an index (1, 2, ...). While replies are followed, commands wait in
   ``pending`` for their final reply; replies answer them in order (RFC 959 §4.2: one
   reply per command, so pipelined commands are answered in the order sent). A 1xx reply is
   preliminary and answers nothing; a multi-line reply (``NNN-`` ... ``NNN ``) counts once,
   when its last line arrives.
3. An address announcement is acted on only in these places:
   - ``PORT`` / ``EPRT`` / ``LPRT`` (RFC 959 §4.1.2, RFC 2428 §2, RFC 1639) sent by the client;
   - ``227`` / ``229`` / ``228`` (RFC 959 §4.2, RFC 2428 §3, RFC 1639) sent by the server as
     the reply to the ``PASV`` / ``EPSV`` / ``LPSV`` that is at the head of ``pending``, i.e.
     the command the client just sent. The address is searched in every line of the reply
     (RFC 1123 §4.1.2.6: the text is not fixed) and the first one found counts.
   Anything else that looks like one (a ``227`` sent by a client, a ``227`` that answers
   another command or nothing) opens nothing and is reported as ``unsolicited``. A reply that
   starts with 227 but carries no address (``227 Logout.``) is just a reply.
4. One live pinhole per session, remembered by the index of the command that announced it
   (the PORT itself, or the PASV that the 227 answered). It is closed when a new
   announcement replaces it, when the server refuses the PORT/EPRT/LPRT that announced it
   (4xx/5xx), and when a transfer command sent at or after that index gets its final reply.
   The caller closes it too on timeout and at the end of the connection (``closed()``).
5. SELECTED (``Session(selected=True)``): the kernel lets through without queueing every
   segment that carries no address verb or passive reply, so most commands and replies are
   never seen. Only PASV/EPSV/LPSV/PORT/EPRT/LPRT/AUTH wait for replies, and a 227/228/229
   or 234 answers the newest of them if it is the command that asks for it (replies come in
   order: everything older is answered too); other replies answer nothing. A transfer's end
   is not seen: its pinhole closes when the kernel has used it (``Alg.pinhole_gone``).
6. ``AUTH`` (RFC 4217 ``AUTH TLS``, RFC 2228 ``AUTH SSL``) answered by ``234`` turns the
   control connection into TLS: from the byte after the 234 line on, both directions are
   opaque (``encrypted``) and the caller must stop reading lines; the live pinhole closes.
   RFC 4217 §4: the client sends nothing after AUTH until its reply, so no plain command
   follows the 234 and no TLS byte precedes it.
7. NAT64 (RFC 6384, ``Session(xlat=...)``: a connection that crossed an IPv6-to-IPv4
   translator, see ``nat64.py``): while enabled (``ALGS ENABLE64 | DISABLE64``), ``EPSV`` /
   ``EPSV 2`` / ``LPSV`` go to the server as ``PASV`` and its 227 back as 229 / 228
   (``render``); ``EPRT |2|`` / ``LPRT 6`` go as ``PORT`` with the client's IPv4-side address
   (then announced as any PORT); ``EPSV ALL``, ``EPSV <n != 2>`` and ``ALGS ...`` (watched
   whether enabled or not) are answered by ftpalg: the server gets ``NOOP`` and the reply to
   it is replaced by ftpalg's answer (a 2xx; any other code is relayed as the answer). The
   lines of a translated multi-line reply other than its last go out removed.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import ftp
from .events import Close, Closing, Reason, Translation
from .nat64 import Kind, Sub, Xlat, embedded

HOSTPORT_VERBS = frozenset({b"PORT", b"EPRT", b"LPRT"})
TRANSFER_VERBS = frozenset({b"RETR", b"STOR", b"STOU", b"APPE", b"LIST", b"NLST", b"MLSD"})
# the command each passive reply answers
PASSIVE_VERB = {ftp.Form.PASV: b"PASV", ftp.Form.EPSV: b"EPSV", ftp.Form.LPSV: b"LPSV"}
# SELECTED: the commands whose replies matter, the only ones remembered when not every line
# is seen (their replies, 227/228/229/234, are queued by the kernel whatever else is not).
_PASSIVE_VERBS = frozenset(PASSIVE_VERB.values())
SELECTED_VERBS = frozenset({b"PASV", b"EPSV", b"LPSV", b"PORT", b"EPRT", b"LPRT", b"AUTH"})
# NAT64: the commands a translated connection's session may translate (RFC 6384)
XLAT_VERBS = frozenset({b"EPSV", b"LPSV", b"EPRT", b"LPRT", b"ALGS"})
ANSWER_EPSV_ALL = b"504 EPSV ALL not supported by the NAT64 FTP ALG; use EPSV"
ANSWER_EPSV_AF = b"522 Network protocol not supported, use (2)"
MAX_PENDING = 64
ARG_MAX = 256  # bytes of a transfer's path (or a user name) kept for the audit record
MAX_TRANSFERS = 4  # transfer commands whose path is remembered until their reply
_REPLY_SEPARATORS = b" -\r\n"  # what may follow a reply code (see ftp.parse_reply)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A transfer command and its final reply (for the audit log)."""

    cmd: int  # its index
    verb: bytes
    arg: bytes  # the path, at most ARG_MAX bytes
    code: int
    text: bytes  # the reply's text (its last line), at most ARG_MAX bytes


@dataclass(frozen=True, slots=True)
class Decision:
    """What one line means for the gateway."""

    announce: ftp.HostPort | None = None  # an address to open a pinhole for (and rewrite)
    cmd: int = 0  # index of the command the announcement belongs to
    close: Closing | None = None  # close the live pinhole, for this reason (before announcing)
    problem: tuple[Reason, str] | None = None  # (reason, detail) to count and log
    done: Transfer | None = None  # a transfer command got its final reply
    tls: str | None = None  # the connection went TLS (AUTH answered 234): what to tell
    # NAT64: the line to send instead (b"": left out), before any announcement in it
    rewrite: bytes | None = None
    render: ftp.Form | None = None  # the line goes out as this passive reply for the live pinhole (425 if none)
    xlat: Translation | None = None  # what the translation did, for the events

    def __bool__(self) -> bool:
        return (self.announce is not None or self.close is not None or self.problem is not None
                or self.done is not None or self.tls is not None or self.rewrite is not None
                or self.render is not None)


NOTHING = Decision()
_ENCRYPTED = Closing(Close.ENCRYPTED, "control connection encrypted (AUTH)")


class Session:
    __slots__ = ("pending", "count", "live", "reply_code", "reply_cmd", "reply_found", "encrypted", "user",
                 "last_verb", "paths", "unrecorded", "selected", "xlat", "reply_sub")

    def __init__(self, selected: bool = False, xlat: Xlat | None = None) -> None:
        # ``selected``: only the lines that may carry an address reach the session (the
        # kernel queues nothing else, see rules.py): see SELECTED below.
        self.selected = selected
        # lists, not deques: at most MAX_PENDING / MAX_TRANSFERS short entries, and an empty
        # list is 56 bytes where an empty deque is ~600 (memory per tracked connection)
        self.pending: list[tuple[bytes, int]] = []
        self.count = 0  # commands seen
        self.live: int | None = None  # index of the command behind the live pinhole
        self.reply_code = 0  # code of an open multi-line reply, 0 if none
        self.reply_cmd: tuple[bytes, int] | None = None  # the command the open reply answers
        self.reply_found = False  # the open passive reply already announced an address
        self.encrypted = False  # AUTH accepted (234): the rest of the connection is TLS
        self.unrecorded = 0  # commands beyond MAX_PENDING: owed replies, after those of ``pending``
        self.user = b""  # the argument of the last USER (ARG_MAX bytes at most)
        self.last_verb = b""  # the last command's verb
        self.paths: list[tuple[int, bytes]] = []  # (index, path) of the last MAX_TRANSFERS transfers
        self.xlat = xlat  # NAT64: the connection crossed a translator (None: it did not)
        self.reply_sub: Sub | None = None  # the translated command the open reply answers

    # ---- client side --------------------------------------------------------------------
    def command(self, line: bytes, follow_replies: bool = True) -> Decision:
        """One command line from the client. ``follow_replies``: whether the caller also
        feeds this connection's replies (otherwise nothing waits for them)."""
        self.count += 1
        n = self.count
        verb = ftp.command_verb(line)
        self.last_verb = verb
        x = self.xlat
        if (x is not None and verb in XLAT_VERBS and follow_replies and not self.unrecorded
                and len(self.pending) < MAX_PENDING):
            t = self._translate(x, verb, line, n)
            if t is not None:
                return t
        if self.selected:
            if verb in SELECTED_VERBS:  # others are lines seen by chance: their replies are not
                self._owe(verb, n)
        elif follow_replies:
            if self.unrecorded or len(self.pending) >= MAX_PENDING:
                self.unrecorded += 1  # never forget the oldest: replies would shift onto later commands
            else:
                self.pending.append((verb, n))
        if verb == b"USER" or verb in TRANSFER_VERBS:
            parts = line.split(None, 1)
            arg = parts[1].strip()[:ARG_MAX] if len(parts) > 1 else b""
            if verb == b"USER":
                self.user = arg
            elif follow_replies and not self.selected:
                self.paths.append((n, arg))
                if len(self.paths) > MAX_TRANSFERS:
                    del self.paths[0]
        if verb in HOSTPORT_VERBS:
            try:
                hp = ftp.parse_hostport(line)
            except ftp.ParseError as e:
                return Decision(problem=(Reason.MALFORMED, f"{e}: {line[:80]!r}"))
            if hp is None:
                return NOTHING
            return Decision(announce=hp, cmd=n, close=self._replacing(hp))
        if verb and 0x30 <= verb[0] <= 0x39 and verb[:3].isdigit() and int(verb[:3]) in ftp.PASSIVE_REPLY_CODES:
            return Decision(problem=(Reason.UNSOLICITED, f"{line[:80]!r} sent by the client: opens nothing"))
        return NOTHING

    # ---- across a restart ------------------------------------------------------------------
    def awaiting(self) -> bytes:
        """The newest passive command (PASV, EPSV, LPSV) still waiting for its reply, or b"":
        what a stop for a restart hands over to the next ftpalg (``resume``)."""
        if self.encrypted or self.reply_code:
            return b""
        return next((verb for verb, _ in reversed(self.pending) if verb in _PASSIVE_VERBS), b"")

    def resume(self, awaiting: bytes) -> None:
        """Picked up at a reply by a new ftpalg: the one before it saw the client send
        ``awaiting`` (``awaiting()``, kept in the kernel's entry), whose reply may announce
        an address now. Anything else is unknown: the pick-up's usual strictness."""
        if awaiting in _PASSIVE_VERBS and not self.pending:
            self.count += 1
            self.pending.append((awaiting, self.count))

    # ---- server side --------------------------------------------------------------------
    def reply(self, line: bytes) -> Decision:
        """One line of a reply from the server."""
        if self.reply_code:  # inside a multi-line reply
            last = line[:3] == b"%03d" % self.reply_code and line[3:4] == b" "
            if self.reply_sub is not None:
                code = self.reply_code
                if last:
                    self.reply_code = 0
                return self._translated_reply(self.reply_sub, line, code, last)
            found = self._passive(line, self.reply_code)
            if not last:
                return found
            code, self.reply_code = self.reply_code, 0
            return self._merge(found, self._answered(code, line))
        # ftp.parse_reply, inline: every reply line comes here, and a Reply object per line
        # costs more than the rest of this method for most of them
        head, n = line[:3], len(line)
        if n < 3 or not head.isdigit() or (n > 3 and line[3] not in _REPLY_SEPARATORS):
            return NOTHING
        code = int(head)
        if self.selected:
            self.reply_cmd = self._selected_asked(code) if self.pending else None
        else:
            self.reply_cmd = self.pending[0] if self.pending else ((b"", 0) if self.unrecorded else None)
        self.reply_found = False
        x = self.xlat
        if x is not None:
            self.reply_sub = x.subs.get(self.reply_cmd[1]) if self.reply_cmd else None
            if self.reply_sub is not None:
                if n > 3 and line[3] == 0x2D:
                    self.reply_code = code
                    return self._translated_reply(self.reply_sub, line, code, False)
                return self._translated_reply(self.reply_sub, line, code, True)
        found = self._passive(line, code) if code in ftp.PASSIVE_REPLY_CODES else NOTHING
        if n > 3 and line[3] == 0x2D:  # "NNN-": opens a multi-line reply
            self.reply_code = code
            return found
        return self._merge(found, self._answered(code, line))

    def _passive(self, line: bytes, code: int) -> Decision:
        form = ftp.PASSIVE_REPLY_CODES.get(code)
        if form is None or self.reply_found:
            return NOTHING
        try:
            hp = ftp.parse_passive_reply(line, code)
        except ftp.ParseError as e:
            self.reply_found = True
            return Decision(problem=(Reason.MALFORMED, f"{e}: {line[:80]!r}"))
        if hp is None:
            return NOTHING
        self.reply_found = True
        asked = self.reply_cmd
        if asked is None or asked[0] != PASSIVE_VERB[form]:
            what = asked[0].decode("ascii", "replace") if asked else "no command"
            return Decision(problem=(Reason.UNSOLICITED, f"{code} answers {what}, not {PASSIVE_VERB[form].decode()}: "
                                                    "opens nothing"))
        return Decision(announce=hp, cmd=asked[1], close=self._replacing(hp))

    def _answered(self, code: int, line: bytes) -> Decision:
        """The final line of a reply: it answers the oldest pending command."""
        if self.selected:
            return self._answered_selected(code)
        if code < 200 or not (self.pending or self.unrecorded):
            return NOTHING  # preliminary, or the greeting / an unsolicited 421
        if not self.pending:  # the reply of a command beyond MAX_PENDING
            self.unrecorded -= 1
            return NOTHING
        verb, n = self.pending.pop(0)
        if self.xlat is not None:
            self.xlat.subs.pop(n, None)
        if verb in TRANSFER_VERBS:
            path = b""
            while self.paths and self.paths[0][0] <= n:
                i, p = self.paths.pop(0)
                path = p if i == n else path
            done = Transfer(n, verb, path, code, line[4:].strip()[:ARG_MAX])
            return self._merge(Decision(done=done), self._after_reply(verb, n, code))
        return self._after_reply(verb, n, code)

    def _after_reply(self, verb: bytes, n: int, code: int) -> Decision:
        if verb == b"AUTH" and code == 234:
            self.encrypted = True
            return Decision(close=_ENCRYPTED if self.live is not None else None,
                            tls=("AUTH accepted (234): the control connection is TLS from here on; its "
                                 "PORT/EPRT/227/229 cannot be read or rewritten, nothing is opened for them "
                                 "(corrections made before stay in force)"))
        live = self.live
        if live is None:
            return NOTHING
        if verb in HOSTPORT_VERBS and code >= 400 and n == live:
            return Decision(close=Closing(Close.SERVER_REFUSED, f"server refused {verb.decode()} ({code})"))
        if verb in TRANSFER_VERBS and live <= n:
            return Decision(close=Closing(Close.USED, f"{verb.decode()} finished ({code})"))
        return NOTHING

    def _answered_selected(self, code: int) -> Decision:
        """SELECTED: a 227/228/229 or 234 answers the newest address command if it is the one
        that asks for it (PASV/LPSV/EPSV, AUTH); it and everything older are answered then."""
        asked = self.reply_cmd
        if asked is None or asked not in self.pending:
            return NOTHING
        verb, n = asked
        x = self.xlat
        sub = x.subs.get(n) if x is not None else None
        if sub is not None and sub.kind == Kind.ANSWER:  # a NOOP standing for a command ftpalg answered
            if code >= 200:
                self.pending.remove(asked)
                del x.subs[n]  # type: ignore[union-attr]
            return NOTHING
        form = ftp.PASSIVE_REPLY_CODES.get(code)
        if not ((form is not None and verb == PASSIVE_VERB[form]) or (code == 234 and verb == b"AUTH")):
            return NOTHING
        self._drop_pending(self.pending.index(asked) + 1)
        return self._after_reply(verb, n, code)

    def _selected_asked(self, code: int) -> tuple[bytes, int]:
        """SELECTED: the command a reply with ``code`` answers — the newest, unless NOOPs stand
        for commands ftpalg answers: then the oldest that such a reply may answer (the NOOP,
        or the PASV/AUTH a 227/228/229/234 answers; commands whose replies are not queued,
        a PORT's 200, cannot be told answered or not and are passed over)."""
        p = self.pending
        x = self.xlat
        if x is None or not x.owed:
            return p[-1]
        form = ftp.PASSIVE_REPLY_CODES.get(code)
        for entry in p:
            sub = x.subs.get(entry[1])
            if sub is not None and sub.kind == Kind.ANSWER:
                return entry
            if (form is not None and entry[0] == PASSIVE_VERB[form]) or (code == 234 and entry[0] == b"AUTH"):
                return entry
        return p[-1]

    def _drop_pending(self, count: int) -> None:
        """Forget the ``count`` oldest pending commands (and their translations)."""
        x = self.xlat
        if x is not None and x.subs:
            for _, n in self.pending[:count]:
                x.subs.pop(n, None)
        del self.pending[:count]

    # ---- NAT64 (RFC 6384) -----------------------------------------------------------------
    def _owe(self, verb: bytes, n: int) -> None:
        """Command ``n`` (``verb`` as the server got it) waits for its reply."""
        if self.selected and len(self.pending) >= MAX_PENDING:
            self._drop_pending(1)  # replies pair with the newest: the oldest can go
        self.pending.append((verb, n))

    def _translate(self, x: Xlat, verb: bytes, line: bytes, n: int) -> Decision | None:
        """A command of a translated connection, translated; None: it goes as it came (and
        is read as on any connection)."""
        end = ftp.line_end(line)
        if verb == b"ALGS":  # RFC 6384: watched for even while disabled
            arg, before = ftp.argument(line).upper(), x.enabled
            if arg == b"ENABLE64":
                x.enabled = True
            elif arg == b"DISABLE64":
                x.enabled = False
            elif arg != b"STATUS64":
                return None
            return self._answer(x, verb, n, b"216 " + x.status(), end, before)
        if not x.enabled:
            return None
        if verb == b"EPSV":
            arg = ftp.argument(line).upper()
            if arg in (b"", b"2"):
                return self._to_pasv(x, verb, n, ftp.Form.EPSV, end, Translation.EPSV)
            if arg == b"ALL":
                return self._answer(x, verb, n, ANSWER_EPSV_ALL, end)
            if arg.isdigit():
                return self._answer(x, verb, n, ANSWER_EPSV_AF, end)
            return None
        if verb == b"LPSV":  # its 228 names the server's IPv6 address: under the prefix
            if x.prefix is None or ftp.argument(line):
                return None
            return self._to_pasv(x, verb, n, ftp.Form.LPSV, end, Translation.LPSV)
        try:  # EPRT / LPRT
            hp = ftp.parse_hostport(line)
        except ftp.ParseError:
            return None  # reported as malformed by the usual path
        if hp is None or hp.family != 6 or hp.addr is None or embedded(x.prefix, hp.addr):
            # IPv4 (no IPv6 client can know one to name), or an IPv4-embedded address (an
            # IPv4 host that is not the client): as on any connection (refused)
            return None
        x.client6 = hp.addr
        new = ftp.port_command(x.client, hp.port, end)
        php = ftp.parse_hostport(new)
        assert php is not None
        self._owe(b"PORT", n)
        x.translated += 1
        return Decision(announce=php, cmd=n, close=self._replacing(php), rewrite=new,
                        xlat=Translation.EPRT if verb == b"EPRT" else Translation.LPRT)

    def _to_pasv(self, x: Xlat, verb: bytes, n: int, form: ftp.Form, end: bytes, what: Translation) -> Decision:
        self._owe(b"PASV", n)
        x.subs[n] = Sub(Kind.PASSIVE, verb, b"PASV", reply_form=form.value)
        x.translated += 1
        return Decision(cmd=n, rewrite=b"PASV" + end, xlat=what)

    def _answer(self, x: Xlat, verb: bytes, n: int, answer: bytes, end: bytes, enabled: bool = True) -> Decision:
        """ftpalg answers command ``n`` itself: the server gets a NOOP (RFC 6384)."""
        self._owe(b"NOOP", n)
        x.subs[n] = Sub(Kind.ANSWER, verb, b"NOOP", answer=answer, enabled=enabled)
        x.translated += 1
        return Decision(cmd=n, rewrite=b"NOOP" + end, xlat=Translation.NOOP)

    def untranslated(self, cmd: int) -> None:
        """Command ``cmd`` went to the server as the client sent it (its rewrite failed): its
        reply is the server's own answer to it, relayed as it comes."""
        x = self.xlat
        sub = x.subs.pop(cmd, None) if x is not None else None
        if sub is None:
            return
        if sub.verb == b"ALGS":  # the server got it, not ftpalg: nothing changed
            x.enabled = sub.enabled  # type: ignore[union-attr]
        for i, entry in enumerate(self.pending):
            if entry[1] == cmd:
                self.pending[i] = (sub.verb, cmd)

    def _translated_reply(self, sub: Sub, line: bytes, code: int, last: bool) -> Decision:
        """One line of the reply to a translated command."""
        answered = self._answered(code, line) if last else NOTHING
        if sub.kind == Kind.ANSWER:
            if not 200 <= code < 300:  # the server refused the NOOP: the client gets its reply
                if not last or code < 200:
                    return answered
                why = (f"the server answered {code} to the NOOP standing for {sub.verb.decode('ascii', 'replace')}: "
                       "relayed as the answer")
                return self._merge(Decision(problem=(Reason.NOOP_REFUSED, why)), answered)
            if not last:
                return Decision(rewrite=b"", xlat=Translation.REMOVED)
            return self._merge(Decision(rewrite=sub.answer + ftp.line_end(line), xlat=Translation.ANSWERED), answered)
        if code != 227:  # the PASV refused (or a 1xx): the client gets the server's reply as it is
            if last:
                self.reply_sub = None
            return self._merge(self._passive(line, code) if code in ftp.PASSIVE_REPLY_CODES else NOTHING, answered)
        found = self._passive(line, code)
        if not last:
            return self._merge(found, Decision(rewrite=b"", xlat=Translation.REMOVED))
        asked = self.reply_cmd[1] if self.reply_cmd else 0
        render = Decision(cmd=asked, render=ftp.Form(sub.reply_form), xlat=Translation.REPLY)
        return self._merge(self._merge(found, render), answered)

    # ---- the live pinhole ----------------------------------------------------------------
    def _replacing(self, hp: ftp.HostPort) -> Closing | None:
        return Closing(Close.REPLACED, f"replaced by a new {hp.form.name}") if self.live is not None else None

    def opened(self, cmd: int) -> None:
        """The caller opened the pinhole announced by command ``cmd``."""
        self.live = cmd

    def closed(self) -> None:
        """The caller closed the live pinhole."""
        self.live = None

    @staticmethod
    def _merge(a: Decision, b: Decision) -> Decision:
        if b is NOTHING:  # the usual case, without calling Decision.__bool__
            return a
        if a is NOTHING:
            return b
        if not b:
            return a
        if not a:
            return b
        # an announcement and the end of its own reply: the close (if any) came first
        return Decision(a.announce or b.announce, a.cmd or b.cmd, a.close or b.close, a.problem or b.problem,
                        a.done or b.done, a.tls or b.tls, a.rewrite if a.rewrite is not None else b.rewrite,
                        a.render or b.render, a.xlat or b.xlat)
