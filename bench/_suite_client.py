"""Client side of bench/suite.py, run inside a lab namespace (``ip netns exec NS python
bench/_suite_client.py CMD ...``). Raw sockets, no ftplib: the client's own CPU shares the
2 cores with the gateway and the servers. Each command prints one JSON line.

    rtt HOST --count N --warmup W             NOOP round trips (ns) on one logged-in connection
    noops HOST --procs P --depth D --duration S --start-at T
                                              P connections, each sending D NOOPs (a segment each)
                                              then reading their replies, in a loop: NOOPs/s
    sessions HOST --mode PORT|PASV --procs P --duration S --start-at T [--source A] [--size B]
                                              P forked workers loop login + PORT/PASV + RETR + QUIT
    download HOST NAME --size B               one PASV download: bytes, seconds
    hold HOST --count N                       N control connections (greeting read), local ports
                                              printed; kept open until stdin closes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

TIMEOUT = 10.0


class FtpError(Exception):
    pass


class Control:
    """One control connection: send a command, read its (possibly multi-line) reply."""

    def __init__(self, host: str, source: str | None = None, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((host, 21), timeout, source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.sock.makefile("rb")

    def reply(self) -> tuple[int, bytes]:
        line = self.f.readline()
        if len(line) < 4:
            raise FtpError(f"connection closed ({line!r})")
        code = line[:3]
        if line[3:4] == b"-":
            while True:
                more = self.f.readline()
                if not more:
                    raise FtpError("connection closed in a multi-line reply")
                if more[:3] == code and more[3:4] == b" ":
                    break
        return int(code), line

    def cmd(self, text: str, *want: int) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.expect(*want)

    def expect(self, *want: int) -> bytes:
        code, line = self.reply()
        if code not in want:
            raise FtpError(f"{code} {line[4:].strip().decode(errors='replace')}")
        return line

    def login(self) -> None:
        self.expect(220)
        if self.cmd("USER anonymous", 230, 331).startswith(b"331"):
            self.cmd("PASS bench@", 230)

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def parse227(line: bytes) -> tuple[str, int]:
    start = line.index(b"(") + 1
    nums = [int(x) for x in line[start : line.index(b")", start)].split(b",")]
    return ".".join(map(str, nums[:4])), nums[4] * 256 + nums[5]


def read_all(sock: socket.socket, buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    while True:
        n = sock.recv_into(view)
        if not n:
            return total
        total += n


def session(host: str, mode: str, source: str | None, name: str, size: int, buf: bytearray) -> None:
    """login, TYPE I, PORT or PASV, RETR ``name`` (``size`` bytes checked), QUIT."""
    c = Control(host, source)
    try:
        c.login()
        c.cmd("TYPE I", 200)
        if mode == "PORT":
            local = c.sock.getsockname()[0]
            with socket.socket() as ls:
                ls.bind((local, 0))
                ls.listen(1)
                ls.settimeout(TIMEOUT)
                port = ls.getsockname()[1]
                c.cmd(f"PORT {local.replace('.', ',')},{port >> 8},{port & 0xFF}", 200)
                c.sock.sendall(f"RETR {name}\r\n".encode())
                c.expect(150, 125)
                d, _ = ls.accept()
        else:
            addr, port = parse227(c.cmd("PASV", 227))
            d = socket.create_connection((addr, port), TIMEOUT, source_address=(c.sock.getsockname()[0], 0))
            c.sock.sendall(f"RETR {name}\r\n".encode())
            c.expect(150, 125)
        with d:
            d.settimeout(TIMEOUT)
            got = read_all(d, buf)
        c.expect(226)
        if got != size:
            raise FtpError(f"got {got} bytes, not {size}")
        c.cmd("QUIT", 221)
    finally:
        c.close()


def worker(args: argparse.Namespace, out: int) -> None:
    buf = bytearray(65536)
    end = args.start_at + args.duration
    while time.time() < args.start_at:
        time.sleep(0.001)
    ok = late = 0
    failures: dict[str, int] = {}
    times: list[float] = []
    while time.time() < end:
        t = time.perf_counter()
        try:
            session(args.host, args.mode, args.source, args.name, args.size, buf)
        except (OSError, FtpError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"[:120]
            failures[why] = failures.get(why, 0) + 1
            time.sleep(0.01)
            continue
        if time.time() <= end:
            ok += 1
            times.append(time.perf_counter() - t)
        else:
            late += 1  # finished after the window: not counted
    os.write(out, (json.dumps({"ok": ok, "late": late, "failures": failures, "times": times}) + "\n").encode())


def cmd_sessions(args: argparse.Namespace) -> dict[str, Any]:
    results = fan_out(args, worker)
    failures: dict[str, int] = {}
    for res in results:
        for k, v in res["failures"].items():
            failures[k] = failures.get(k, 0) + v
    times = sorted(t for res in results for t in res["times"])
    ok = sum(res["ok"] for res in results)
    return {"ok": ok, "late": sum(res["late"] for res in results), "failed": sum(failures.values()),
            "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1])[:5]), "workers": len(results),
            "duration": args.duration, "per_s": ok / args.duration,
            "median_ms": times[len(times) // 2] * 1e3 if times else None}


def cmd_rtt(args: argparse.Namespace) -> dict[str, Any]:
    c = Control(args.host)
    try:
        c.login()
        s = c.sock
        ns: list[int] = []
        clock = time.perf_counter_ns
        for i in range(args.warmup + args.count):
            t = clock()
            s.sendall(b"NOOP\r\n")
            data = s.recv(512)
            while not data.endswith(b"\n"):
                more = s.recv(512)
                if not more:
                    raise FtpError("connection closed")
                data += more
            dt = clock() - t
            if not data.startswith(b"200"):
                raise FtpError(data.decode(errors="replace"))
            if i >= args.warmup:
                ns.append(dt)
        c.cmd("QUIT", 221)
    finally:
        c.close()
    return {"ns": ns}


def noop_worker(args: argparse.Namespace, out: int) -> None:
    """One logged-in connection: ``depth`` NOOPs sent one segment each, then their replies
    read, until the window closes; writes the number of NOOPs answered inside it."""
    c = Control(args.host)
    c.login()
    s = c.sock
    while time.time() < args.start_at:
        time.sleep(0.001)
    end = args.start_at + args.duration
    done = 0
    buf = b""
    while time.time() < end:
        for _ in range(args.depth):
            s.sendall(b"NOOP\r\n")
        want = args.depth
        while want:
            data = s.recv(4096)
            if not data:
                raise FtpError("connection closed")
            buf += data
            n = buf.count(b"\n")
            want -= n
            buf = buf[buf.rfind(b"\n") + 1:] if n else buf
        done += args.depth
    c.cmd("QUIT", 221)
    c.close()
    os.write(out, (json.dumps({"noops": done}) + "\n").encode())


def cmd_noops(args: argparse.Namespace) -> dict[str, Any]:
    results = fan_out(args, noop_worker)
    total = sum(r["noops"] for r in results)
    return {"noops": total, "procs": len(results), "per_s": total / args.duration}


def fan_out(args: argparse.Namespace, fn: Any) -> list[dict[str, Any]]:
    """Run ``fn(args, fd)`` in ``args.procs`` forked processes; their JSON lines."""
    pids, reads = [], []
    for _ in range(args.procs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                fn(args, w)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        pids.append(pid)
        reads.append(r)
    results = []
    for r in reads:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        if data.strip():
            results.append(json.loads(data))
    for pid in pids:
        os.waitpid(pid, 0)
    return list(results)


def cmd_download(args: argparse.Namespace) -> dict[str, Any]:
    c = Control(args.host, timeout=60)
    try:
        c.login()
        c.cmd("TYPE I", 200)
        addr, port = parse227(c.cmd("PASV", 227))
        d = socket.create_connection((addr, port), 60)
        buf = bytearray(1 << 20)
        with d:
            c.sock.sendall(f"RETR {args.name}\r\n".encode())
            c.expect(150, 125)
            t = time.perf_counter()
            got = read_all(d, buf)
            dt = time.perf_counter() - t
        c.expect(226)
        c.cmd("QUIT", 221)
    finally:
        c.close()
    if got != args.size:
        raise FtpError(f"got {got} bytes, not {args.size}")
    return {"bytes": got, "seconds": dt}


def cmd_hold(args: argparse.Namespace) -> None:
    conns = []
    for _ in range(args.count):
        c = Control(args.host)
        c.expect(220)
        conns.append(c)
    print(json.dumps({"ports": [c.sock.getsockname()[1] for c in conns], "local": conns[0].sock.getsockname()[0]}),
          flush=True)
    sys.stdin.read()  # until the suite closes our stdin
    for c in conns:
        c.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rtt")
    r.add_argument("host")
    r.add_argument("--count", type=int, default=1000)
    r.add_argument("--warmup", type=int, default=100)
    s = sub.add_parser("sessions")
    s.add_argument("host")
    s.add_argument("--mode", choices=["PORT", "PASV"], required=True)
    s.add_argument("--procs", type=int, default=8)
    s.add_argument("--duration", type=float, required=True)
    s.add_argument("--start-at", type=float, required=True, help="time.time() at which all workers start")
    s.add_argument("--source")
    s.add_argument("--name", default="small.txt")
    s.add_argument("--size", type=int, default=1000)
    n = sub.add_parser("noops")
    n.add_argument("host")
    n.add_argument("--procs", type=int, default=8)
    n.add_argument("--depth", type=int, default=4)
    n.add_argument("--duration", type=float, required=True)
    n.add_argument("--start-at", type=float, required=True)
    d = sub.add_parser("download")
    d.add_argument("host")
    d.add_argument("name")
    d.add_argument("--size", type=int, required=True)
    h = sub.add_parser("hold")
    h.add_argument("host")
    h.add_argument("--count", type=int, default=200)
    args = ap.parse_args()
    if args.cmd == "hold":
        cmd_hold(args)
        return 0
    fn = {"rtt": cmd_rtt, "sessions": cmd_sessions, "noops": cmd_noops, "download": cmd_download}[args.cmd]
    print(json.dumps(fn(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
