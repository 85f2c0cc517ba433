"""The queue fails open (NFQA_CFG_F_FAIL_OPEN, set by ftpalg.linux.nfqueue itself): with the
queue full, the kernel passes packets unchanged instead of dropping them.

In a throw-away namespace, UDP datagrams to lo are queued to a reader that binds the queue
with a small max_len and never reads it: with fail-open every datagram beyond max_len still
arrives and the queue counts no drops; without it they are dropped and counted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ftpalg.lab.lab import remove_namespaces, run
from ftpalg.linux.nfqueue import NFQA_CFG_F_FAIL_OPEN, config_flags_message

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
QUEUE = 77
PORT = 9999
MAXLEN = 8
SENT = 100

READER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from netfilterqueue import NetfilterQueue
    from ftpalg.linux.nfqueue import set_queue_flags, NFQA_CFG_F_FAIL_OPEN
    queue, maxlen, mode = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    seen = []
    def cb(pkt):
        seen.append(len(pkt.get_payload()))
        pkt.accept()
    nfq = NetfilterQueue()
    nfq.bind(queue, cb, max_len=maxlen)
    print("bound", flush=True)
    if mode == "replay":  # packets wait in the socket before the ACK: they must reach cb
        input()
    err = set_queue_flags(nfq, queue, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN) if mode != "off" else 0
    print("set", err, len(seen), flush=True)
    input()  # never reads the queue (except the replay above) until told to go
""")

SEND = textwrap.dedent("""
    import socket, sys, time
    n, port = int(sys.argv[1]), int(sys.argv[2])
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", port))
    rx.settimeout(0.5)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        tx.sendto(b"x%d" % i, ("127.0.0.1", port))
    got = 0
    try:
        while True:
            rx.recv(100)
            got += 1
    except OSError:
        pass
    print(got)
""")


@pytest.fixture
def ns():
    name = f"fl{os.getpid()}-i"
    remove_namespaces([name])
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "netns", "exec", name, "iptables", "-A", "OUTPUT", "-o", "lo", "-p", "udp", "--dport", str(PORT),
             "-j", "NFQUEUE", "--queue-num", str(QUEUE)])
        yield name
    finally:
        remove_namespaces([name])


def queue_stats(ns: str) -> dict[str, int]:
    text = run(["ip", "netns", "exec", ns, "cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    for line in text.splitlines():
        f = line.split()
        if int(f[0]) == QUEUE:
            return {"total": int(f[2]), "dropped": int(f[5]), "user_dropped": int(f[6])}
    raise AssertionError(text)


def send(ns: str, n: int) -> int:
    return int(run(["ip", "netns", "exec", ns, sys.executable, "-c", SEND, str(n), str(PORT)], timeout=30).stdout)


def reader(ns: str, mode: str) -> subprocess.Popen[str]:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", READER, str(ROOT), str(QUEUE),
                          str(MAXLEN), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "bound"
    return p


def finish(p: subprocess.Popen[str]) -> None:
    try:
        p.communicate("\n", timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_config_message_layout():
    msg = config_flags_message(0x1234, NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_FAIL_OPEN, 7)
    assert len(msg) == 16 + 4 + 8 + 8 and int.from_bytes(msg[:4], sys.byteorder) == len(msg)
    assert int.from_bytes(msg[4:6], sys.byteorder) == 0x0302  # NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG
    assert int.from_bytes(msg[6:8], sys.byteorder) == 0x5  # NLM_F_REQUEST | NLM_F_ACK
    assert msg[16:20] == b"\x00\x00\x12\x34"  # AF_UNSPEC, version 0, res_id = htons(queue)
    assert msg[20:28] == (8).to_bytes(2, sys.byteorder) + (4).to_bytes(2, sys.byteorder) + b"\x00\x00\x00\x01"
    assert msg[28:36] == (8).to_bytes(2, sys.byteorder) + (5).to_bytes(2, sys.byteorder) + b"\x00\x00\x00\x01"


def test_full_queue_passes_packets_with_fail_open(ns):
    p = reader(ns, "on")
    try:
        assert p.stdout is not None
        assert p.stdout.readline().split()[:2] == ["set", "0"]
        got = send(ns, SENT)
        stats = queue_stats(ns)
    finally:
        finish(p)
    assert got == SENT - MAXLEN, (got, stats)  # only the ones waiting in the queue are missing
    assert stats == {"total": MAXLEN, "dropped": 0, "user_dropped": 0}


def test_full_queue_drops_packets_without_fail_open(ns):
    p = reader(ns, "off")
    try:
        assert p.stdout is not None
        assert p.stdout.readline().split()[:2] == ["set", "0"]
        got = send(ns, SENT)
        stats = queue_stats(ns)
    finally:
        finish(p)
    assert got == 0
    assert stats == {"total": MAXLEN, "dropped": SENT - MAXLEN, "user_dropped": 0}


def test_packets_queued_before_the_ack_reach_the_callback(ns):
    """Datagrams in the socket ahead of the kernel's ACK are not lost to the handshake: the
    callback gets them (and accepts them) before set_queue_flags returns."""
    p = reader(ns, "replay")
    assert p.stdin is not None and p.stdout is not None
    try:
        tx = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SEND, "5", str(PORT)],
                              stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while queue_stats(ns)["total"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().split() == ["set", "0", "5"]
        assert int(tx.communicate(timeout=20)[0]) == 5
    finally:
        finish(p)
