"""Floods against an FTP gateway, run from a lab namespace (``ip netns exec``), for bench/
and tests: each prints one JSON line of what it did.

``python -m ftpalg.lab.floods syn DST --source A [--source B] [--rate R] [--duration S]``
    SYNs to DST:21 from many source ports of the lab client addresses given, at R per
    second for S seconds, over a raw socket (IP_HDRINCL; headers built with struct). The
    sources are real addresses of the namespace, so the SYN-ACKs come back to it (and its
    kernel answers them with RST): nothing leaves the lab.
``python -m ftpalg.lab.floods connect DST --source A [--count N] [--rate R] [--hold S] [--say L]``
    N real TCP connections to DST:21 at R per second: each reads the greeting (and sends
    line L, if given) and is closed at once (``--hold 0``), or all stay open, idle, ``S``
    seconds after the last one opened.
``python -m ftpalg.lab.floods abandon DST --source A [--count N] [--mode PORT|PASV] [--hold S]``
    N control connections that log in anonymously, send PORT (the connection's own address,
    a port of 40000-42999 each) or PASV, read the reply and are abandoned without QUIT: left
    open ``S`` seconds, then dropped (``--reset``: with RST instead of FIN). Exercises the
    pinhole caps; the reply codes are counted (a PORT the gateway did not rewrite is refused
    by the server as foreign).
``python -m ftpalg.lab.floods legit DST --sha256 H [--source A] [--duration S] [--mode M]``
    Legitimate sessions meanwhile: log in, download small.txt in mode M (checked against
    SHA-256 H), QUIT, back to back on a few threads for S seconds; counts tried and ok.
``python -m ftpalg.lab.floods server ADDR ROOT [PORT]``
    The flood target: pyftpdlib with one IOLoop (no thread per connection, no connection
    cap), the lab's handler (anonymous, default security), except that PORT/EPRT are only
    noted (``200``) and never connected: like vsftpd until a transfer, so the gateway's
    pinholes stay unused. ``start_server`` runs it at ``FLOOD_SERVER`` in a lab.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import random
import resource
import selectors
import socket
import struct
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess

    from .lab import Lab

FLOOD_SERVER = "203.0.113.60"
"""Where ``start_server`` runs the flood target: an extra address in the lab's outside
namespace (<p>-s, device s0), no lab server on it."""
FIRST_DATA_PORT, DATA_PORTS = 40000, 3000  # the lab's fixed data ports (lab.FIXED_PORTS: below the ephemeral range)


def raise_fd_limit(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE towards ``want`` (root may raise the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new in ((want, max(want, hard)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            return new[0]
        except (ValueError, OSError):
            continue
    return soft


# ---- SYN flood ---------------------------------------------------------------------------------
def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


class SynFactory:
    """SYN packets (IPv4 + 20-byte TCP header, no options) from ``src`` to ``dst``:``dport``;
    only the source port and the sequence number vary, so the TCP checksum is a constant sum
    plus those two, folded."""

    IP = struct.Struct("!BBHHHBBH4s4s")
    TCP = struct.Struct("!HHIIBBHHH")

    def __init__(self, src: str, dst: str, dport: int) -> None:
        s, d = socket.inet_aton(src), socket.inet_aton(dst)
        # total length, id and header checksum: the kernel fills them in (IP_HDRINCL)
        self.ip = self.IP.pack(0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP, 0, s, d)
        self.dport = dport
        words = struct.unpack("!4H", s + d)
        self.base = sum(words) + socket.IPPROTO_TCP + 20 + dport + ((5 << 12) | 0x02) + 64240

    def packet(self, sport: int, seq: int) -> bytes:
        csum = ~_fold(self.base + sport + (seq >> 16) + (seq & 0xFFFF)) & 0xFFFF
        return self.ip + self.TCP.pack(sport, self.dport, seq, 0, 5 << 4, 0x02, 64240, csum, 0)


def syn_flood(dst: str, sources: list[str], port: int = 21, rate: float = 5000.0, duration: float = 5.0,
              sport_range: tuple[int, int] = (1024, 65535)) -> dict[str, Any]:
    """Send SYNs at ``rate`` per second for ``duration`` seconds, round-robin over
    ``sources``, each source cycling through ``sport_range``; random ISNs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    makers = [SynFactory(s, dst, port) for s in sources]
    lo, hi = sport_range
    rnd = random.Random()
    sent = nobufs = 0
    sport = lo + rnd.randrange(hi - lo)
    t0 = time.monotonic()
    tick = 0.005
    per_tick = max(1, round(rate * tick))
    next_t = t0
    end = t0 + duration
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now < next_t:
            time.sleep(next_t - now)
        for _ in range(per_tick):
            m = makers[sent % len(makers)]
            sport = sport + 1 if sport < hi else lo
            try:
                sock.sendto(m.packet(sport, rnd.getrandbits(32)), (dst, 0))
                sent += 1
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                nobufs += 1
                time.sleep(0.001)
        next_t += tick
        if next_t < time.monotonic() - 0.5:  # far behind (a busy machine): do not burst to catch up
            next_t = time.monotonic()
    secs = time.monotonic() - t0
    sock.close()
    return {"flood": "syn", "sent": sent, "enobufs": nobufs, "seconds": round(secs, 2),
            "rate": round(sent / secs) if secs else 0}


# ---- connection flood ----------------------------------------------------------------------------
def connect_flood(dst: str, sources: list[str], port: int = 21, count: int = 1000, rate: float = 500.0,
                  hold: float = 0.0, timeout: float = 10.0, say: str = "") -> dict[str, Any]:
    """Open ``count`` TCP connections at ``rate`` per second (non-blocking, many at once).
    ``hold`` 0: each is closed once the server's greeting arrived (or ``timeout`` passed);
    otherwise all stay open ``hold`` seconds after the last one opened, then are closed.
    ``say``: a line each sends once greeted (e.g. ``NOOP``: the client has spoken, so a
    gateway that tracks control connections from their first command tracks this one)."""
    raise_fd_limit()
    sel = selectors.DefaultSelector()
    stats: Counter[str] = Counter()
    kept: list[socket.socket] = []
    born: dict[socket.socket, float] = {}
    t0 = time.monotonic()

    def done(s: socket.socket, outcome: str) -> None:
        stats[outcome] += 1
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(s)
        born.pop(s, None)
        if hold > 0 and outcome == "greeted":
            kept.append(s)
        else:
            s.close()

    opened = 0
    while opened < count or born:
        now = time.monotonic()
        due = min(count, int((now - t0) * rate) + 1)
        while opened < due:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.bind((sources[opened % len(sources)], 0))
                s.connect_ex((dst, port))
            except OSError:
                stats["bind_failed"] += 1
                s.close()
                opened += 1
                continue
            sel.register(s, selectors.EVENT_READ)
            born[s] = now
            opened += 1
        for key, _ in sel.select(0.01):
            ks = key.fileobj
            assert isinstance(ks, socket.socket)
            try:
                data = ks.recv(4096)
            except OSError:
                done(ks, "failed")
                continue
            if say and data.startswith(b"220"):
                with contextlib.suppress(OSError):
                    ks.send(say.encode() + b"\r\n")
            done(ks, "greeted" if data.startswith(b"220") else "refused" if not data else "other_reply")
        for s, t in list(born.items()):
            if now - t > timeout:
                done(s, "timeout")
    opening = time.monotonic() - t0
    if kept:
        time.sleep(hold)
    for s in kept:
        s.close()
    return {"flood": "connect", "connections": count, **dict(stats), "open_seconds": round(opening, 2),
            "held": len(kept), "seconds": round(time.monotonic() - t0, 2)}


# ---- abandoner -----------------------------------------------------------------------------------
class _Control:
    """A minimal blocking FTP control connection: whole replies, codes only."""

    def __init__(self, dst: str, port: int, source: str, timeout: float) -> None:
        self.sock = socket.create_connection((dst, port), timeout=timeout, source_address=(source, 0))
        self.buf = b""

    def reply(self) -> str:
        """The final line of the next reply (multi-line replies end with ``NNN `` )."""
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                data = self.sock.recv(4096)
                if not data:
                    raise ConnectionError("closed by the server")
                self.buf += data
                continue
            line, self.buf = self.buf[: nl + 1], self.buf[nl + 1 :]
            if len(line) >= 4 and line[:3].isdigit() and line[3:4] == b" ":
                return line.decode("ascii", "replace").strip()

    def cmd(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()


def abandon(dst: str, sources: list[str], port: int = 21, count: int = 500, mode: str = "PORT",
            hold: float = 5.0, workers: int = 16, reset: bool = False, timeout: float = 15.0) -> dict[str, Any]:
    """Log ``count`` control connections in, send ``mode`` on each, read the reply, and leave
    them open ``hold`` seconds after the last one; then drop them all (RST if ``reset``)."""
    raise_fd_limit()
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    kept: list[_Control] = []

    def one(i: int) -> None:
        source = sources[i % len(sources)]
        try:
            c = _Control(dst, port, source, timeout)
        except OSError as e:
            with lock:
                codes[f"connect_{type(e).__name__}"] += 1
            return
        try:
            for step in ("", "USER anonymous", "PASS flood@", "TYPE I"):
                r = c.reply() if not step else c.cmd(step)
                if r[:1] not in "23":
                    raise ConnectionError(f"{step or 'greeting'}: {r}")
            if mode == "PORT":
                p = FIRST_DATA_PORT + i % DATA_PORTS
                here = c.sock.getsockname()[0]
                r = c.cmd(f"PORT {here.replace('.', ',')},{p >> 8},{p & 0xFF}")
            else:
                r = c.cmd("PASV")
            key = r[:3]
        except (OSError, ConnectionError) as e:
            key = f"login_{type(e).__name__}"
        with lock:
            codes[key] += 1
            kept.append(c)

    t0 = time.monotonic()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    opening = time.monotonic() - t0
    time.sleep(hold)
    for c in kept:
        if reset:
            with contextlib.suppress(OSError):
                c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.sock.close()
    return {"flood": "abandon", "mode": mode, "connections": count, "replies": dict(codes),
            "open_seconds": round(opening, 2), "seconds": round(time.monotonic() - t0, 2)}


# ---- legitimate sessions alongside -------------------------------------------------------------
def legit(dst: str, source: str | None, duration: float, want: str, mode: str = "PORT", workers: int = 2,
          transfers: int = 1, timeout: float = 10.0, name: str = "small.txt") -> dict[str, Any]:
    """Sessions (log in, ``transfers`` downloads of ``name`` in ``mode``, each checked against
    the SHA-256 ``want``, QUIT) back to back on ``workers`` threads for ``duration`` seconds."""
    from .ftpclient import LabFTP

    results: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def one() -> str:
        ftp = LabFTP(mode, timeout=timeout)
        where = ""
        try:
            ftp.connect(dst, 21, source_address=(source, 0) if source else None)
            assert ftp.sock is not None
            where = f" (control from port {ftp.sock.getsockname()[1]})"
            ftp.login()
            for _ in range(transfers):
                h = hashlib.sha256()
                ftp.retrbinary(f"RETR {name}", h.update)
                if h.hexdigest() != want:
                    return "checksum mismatch"
            ftp.quit()
        except Exception as e:
            return f"{type(e).__name__}: {e}{where}"
        finally:
            ftp.close()
        return ""

    def worker() -> None:
        while time.monotonic() < stop:
            t = time.monotonic()
            why = one()
            with lock:
                results.append((why, time.monotonic() - t))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = sorted(t for _, t in results)
    fails = Counter(why for why, _ in results if why)
    return {"flood": "legit", "mode": mode, "tried": len(results), "ok": len(results) - sum(fails.values()),
            "failures": dict(fails.most_common(10)),
            "median_s": round(times[len(times) // 2], 3) if times else None,
            "max_s": round(times[-1], 3) if times else None}


def add_client_addresses(lab: Lab, n: int, first: int = 100) -> list[str]:
    """Give the lab's client namespace ``n`` more addresses (10.0.0.<first>..) on c0, for
    floods from many clients; return them."""
    from .lab import CLIENT_NET, run

    addrs = [f"{CLIENT_NET}.{first + i}" for i in range(n)]
    have = run(["ip", "-n", lab.client, "-o", "addr", "show", "dev", "c0"]).stdout
    batch = "".join(f"addr add {a}/24 dev c0\n" for a in addrs if f" {a}/" not in have)
    if batch:
        run(["ip", "-n", lab.client, "-batch", "-"], input=batch)
    return addrs


# ---- the flood target ----------------------------------------------------------------------------
def serve(addr: str, root: str, port: int = 21) -> None:
    """pyftpdlib with one IOLoop and no connection cap; PORT/EPRT only noted (see the module)."""
    import logging

    from pyftpdlib.servers import FTPServer

    from .servers import lab_handler

    logging.getLogger("pyftpdlib").setLevel(logging.ERROR)
    base = lab_handler(root)

    class FloodHandler(base):  # type: ignore[misc, valid-type]
        def _make_eport(self, ip: str, port: int) -> None:
            remote = self.remote_ip.removeprefix("::ffff:")
            if ip != remote:
                self.respond(f"501 Rejected data connection to foreign address {ip}:{port}.")
            elif port < 1024:
                self.respond(f'501 PORT against the privileged port "{port}" refused.')
            else:
                self.respond("200 Active data connection noted (flood server: it never connects).")

    raise_fd_limit()
    server = FTPServer((addr, port), FloodHandler)
    server.max_cons = 0  # unlimited
    server.max_cons_per_ip = 0
    server.serve_forever()


def start_server(lab: Lab, addr: str = FLOOD_SERVER, timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """Add ``addr`` to the lab's outside namespace and run the flood server there (a process
    of the lab: ``lab.down()`` stops it); return once it listens on port 21."""
    from .lab import run

    have = run(["ip", "-n", lab.server, "-o", "addr", "show", "dev", "s0"]).stdout
    if f" {addr}/" not in have:
        run(["ip", "-n", lab.server, "addr", "add", f"{addr}/24", "dev", "s0"])
    log = lab.state / "flood-server.out"
    p = lab.popen(lab.server, [sys.executable, "-m", "ftpalg.lab.floods", "server", addr, str(lab.files)], log)
    lab.wait_ports({lab.server: [(addr, 21)]}, timeout, watch=[p])
    return p


# ---- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ftpalg.lab.floods", description=__doc__.split("\n\n")[0] if __doc__ else "")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("dst")
        p.add_argument("--source", action="append", required=True, help="local address (repeat for several)")
        p.add_argument("--port", type=int, default=21)

    s = sub.add_parser("syn")
    target(s)
    s.add_argument("--rate", type=float, default=5000.0)
    s.add_argument("--duration", type=float, default=5.0)
    c = sub.add_parser("connect")
    target(c)
    c.add_argument("--count", type=int, default=1000)
    c.add_argument("--rate", type=float, default=500.0)
    c.add_argument("--hold", type=float, default=0.0)
    c.add_argument("--say", default="", help="a line to send once greeted (e.g. NOOP)")
    a = sub.add_parser("abandon")
    target(a)
    a.add_argument("--count", type=int, default=500)
    a.add_argument("--mode", choices=["PORT", "PASV"], default="PORT")
    a.add_argument("--hold", type=float, default=5.0)
    a.add_argument("--workers", type=int, default=16)
    a.add_argument("--reset", action="store_true")
    g = sub.add_parser("legit")
    g.add_argument("dst")
    g.add_argument("--source")
    g.add_argument("--duration", type=float, default=10.0)
    g.add_argument("--sha256", required=True)
    g.add_argument("--mode", default="PORT")
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--transfers", type=int, default=1)
    v = sub.add_parser("server")
    v.add_argument("addr")
    v.add_argument("root", type=Path)
    v.add_argument("port", type=int, nargs="?", default=21)
    args = ap.parse_args(argv)
    if args.cmd == "server":
        serve(args.addr, str(args.root), args.port)
        return 0
    if args.cmd == "syn":
        res = syn_flood(args.dst, args.source, args.port, args.rate, args.duration)
    elif args.cmd == "legit":
        res = legit(args.dst, args.source, args.duration, args.sha256, args.mode, args.workers, args.transfers)
    elif args.cmd == "connect":
        res = connect_flood(args.dst, args.source, args.port, args.count, args.rate, args.hold, say=args.say)
    else:
        res = abandon(args.dst, args.source, args.port, args.count, args.mode, args.hold, args.workers,
                      args.reset)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
