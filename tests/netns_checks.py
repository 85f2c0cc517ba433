"""Checks shared by the netns test modules (they need a running lab and ftpalg)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from ftpalg.config import DEFAULT_QUEUE
from ftpalg.lab.lab import INSIDE_SERVERS, OUTSIDE_CLIENTS, PUBLIC_OF, Lab, sha256

FILE = "small.txt"


def queued(lab: Lab, gw: str, queue: int = DEFAULT_QUEUE) -> int:
    """How many packets the gateway's kernel handed to NFQUEUE ``queue`` since ftpalg bound
    it: the queue's id sequence in the namespace's /proc/net/netfilter/nfnetlink_queue (each
    queued packet gets the next id). A packet never queued never reached ftpalg."""
    text = lab.ns(gw, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    for line in text.splitlines():
        f = line.split()
        if int(f[0]) == queue:
            return int(f[7])
    raise AssertionError(f"queue {queue} not bound in {gw}: {text!r}")


def no_pinholes_soon(lab: Lab, gw: str | None = None, within: float = 3.0) -> bool:
    """Whether the gateway's expectations are gone within ``within`` seconds."""
    deadline = time.monotonic() + within
    while lab.expectations(gw):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


PASV_SESSION = textwrap.dedent("""
    import ftplib, hashlib, socket, sys
    host, me, name = sys.argv[1:4]
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(host, 21, source_address=(me, 0))
    ftp.login()
    ftp.voidcmd("TYPE I")
    resp = ftp.sendcmd("PASV")
    print(resp, flush=True)
    host, port = ftplib.parse227(resp)
    input()  # the test probes the port from another client meanwhile
    data = socket.create_connection((host, port), timeout=5, source_address=(me, 0))
    ftp.sendcmd("RETR " + name)
    h = hashlib.sha256()
    while chunk := data.recv(65536):
        h.update(chunk)
    data.close()
    ftp.voidresp()
    print(h.hexdigest(), flush=True)
    try:
        socket.create_connection((host, port), timeout=3, source_address=(me, 0))
        print("second connection accepted", flush=True)
    except OSError:
        print("no second connection", flush=True)
    ftp.quit()
""")
SYN_ONLY = "tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn"
"""tcpdump's filter for the first segment of a connection (not the SYN-ACK)."""


PROBE = textwrap.dedent("""
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3, source_address=(sys.argv[3], 0))
        print("connected")
    except OSError as e:
        print("refused", e)
""")



def check_pasv_pinhole_admits_only_the_announced_client(lab: Lab, note: str = "") -> None:
    """Through gw2's DNAT: the port of the 227 is open to the client of that control
    connection, once; another outside client gets nothing, and neither does the first one
    after its transfer.

    What the server's side refuses proves nothing here: pyftpdlib closes its passive
    listener after one accept, so a second connection that got through the gateway would be
    refused by the server all the same. A capture on the server's link counts the
    connection attempts (SYNs) to the server other than to its control port: exactly one,
    the transfer's, must get through the gateway."""
    host, inside = PUBLIC_OF["pyftpdlib"], INSIDE_SERVERS["pyftpdlib"]
    assert no_pinholes_soon(lab, lab.gw2), lab.expectations(lab.gw2)
    client = subprocess.Popen(["ip", "netns", "exec", lab.server, sys.executable, "-c", PASV_SESSION, host,
                               OUTSIDE_CLIENTS[0], FILE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        line = client.stdout.readline()
        assert line.startswith("227") and host.replace(".", ",") in line, line
        nums = line.split("(")[1].split(")")[0].split(",")
        port = int(nums[4]) * 256 + int(nums[5])
        (exp,) = lab.expectations(lab.gw2)
        assert f"src={OUTSIDE_CLIENTS[0]} dst={host} sport=0 dport={port}" in exp, exp
        path = lab.state / "pasv-pinhole.pcap"
        cap = lab.capture(lab.inside, "i0", path, f"dst host {inside} and not dst port 21 and {SYN_ONLY}")
        try:
            probe = lab.ns(lab.server, [sys.executable, "-c", PROBE, host, str(port), OUTSIDE_CLIENTS[1]],
                           check=False)
            assert probe.stdout.startswith("refused"), f"{note}: {probe.stdout}"
            client.stdin.write("\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == sha256(lab.files / FILE)
            assert client.stdout.readline().strip() == "no second connection"
        finally:
            Lab.stop_capture(cap)
        reached = [p[IP].src for p in rdpcap(str(path)) if IP in p and TCP in p]
        assert reached == [OUTSIDE_CLIENTS[0]], f"{note}: connections that reached the server: {reached}"
        assert client.wait(10) == 0
    finally:
        client.kill()
        client.wait()
    assert no_pinholes_soon(lab, lab.gw2)
