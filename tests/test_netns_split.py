"""Lines split across TCP segments, end to end: a client that writes PORT in two send()s (with
TCP_NODELAY, and with Nagle, which sends the rest only once the first part is acknowledged),
and a server behind DNAT that writes its 227 in two. Transfers are checked by SHA-256, what
the far side received by capture."""

from __future__ import annotations

import sys
import textwrap

import pytest
from scapy.layers.inet import TCP
from scapy.utils import rdpcap

from ftpalg.lab.lab import CLIENTS, GW_PUBLIC, INSIDE_SERVERS, OUTSIDE_CLIENTS, PUBLIC_OF, SERVERS, Lab, sha256

pytestmark = pytest.mark.netns

SPLIT_PORT = r"""
import ftplib, hashlib, socket, sys, time
host, nodelay, src = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
ftp = ftplib.FTP(timeout=10)
ftp.connect(host, 21, source_address=(src, 0))
if nodelay:
    ftp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ftp.login()
ftp.voidcmd("TYPE I")
ls = socket.create_server((src, 0))
p = ls.getsockname()[1]
line = f"PORT {src.replace('.', ',')},{p >> 8},{p & 255}\r\n".encode()
ftp.sock.sendall(line[:12])  # "PORT 10,0,0," ...
time.sleep(0.05)
ftp.sock.sendall(line[12:])  # ... the rest
print(ftp.getresp(), flush=True)
ftp.putcmd("RETR big.bin")
print(ftp.getresp(), flush=True)
c, _ = ls.accept()
h = hashlib.sha256()
while chunk := c.recv(65536):
    h.update(chunk)
c.close()
print(ftp.voidresp(), flush=True)
print(h.hexdigest(), flush=True)
ftp.quit()
"""


def wire(lab: Lab, path, verb: bytes) -> list[bytes]:
    """The lines starting with ``verb`` in a capture, reassembled per connection."""
    streams: dict[tuple[int, int], dict[int, bytes]] = {}
    for p in rdpcap(str(path)):
        if TCP in p and bytes(p[TCP].payload):
            streams.setdefault((p[TCP].sport, p[TCP].dport), {})[p[TCP].seq] = bytes(p[TCP].payload)
    out = []
    for segs in streams.values():
        data = b"".join(segs[k] for k in sorted(segs))
        out += [line.strip() for line in data.splitlines() if line.startswith(verb)]
    return out


@pytest.mark.parametrize("server", ["vsftpd", "pyftpdlib"])
@pytest.mark.parametrize("nodelay", [True, False], ids=["nodelay", "nagle"])
def test_port_split_across_two_segments_is_rewritten(lab, server, nodelay):
    path = lab.state / f"split-{server}-{nodelay}.pcap"
    cap = lab.capture(lab.server, "s0", path)
    p = lab.start_ftpalg()
    try:
        res = lab.ns(lab.client, [sys.executable, "-c", SPLIT_PORT, SERVERS[server], "1" if nodelay else "0",
                                  CLIENTS[0]], check=False, timeout=60)
    finally:
        rc = lab.stop_ftpalg(p)
        Lab.stop_capture(cap)
    assert rc == 0
    out = res.stdout.split("\n")
    assert res.returncode == 0 and out[0].startswith("200") and out[3] == sha256(lab.files / "big.bin"), \
        (res.stdout, res.stderr[-1500:], lab.ftpalg_log()[-2000:])
    seen = wire(lab, path, b"PORT")
    assert seen and all(GW_PUBLIC.replace(".", ",").encode() in s for s in seen), seen
    log = lab.ftpalg_log()
    assert "pinhole open" in log and "Traceback" not in log
    # with NODELAY the rest comes at once; with Nagle when the sender's retransmission timer
    # fires, while the first part still waits
    assert "lines_assembled=1" in log and "partial_line" not in log, log[-600:]


SPLIT_227_SERVER = r"""
import socket, sys, time
addr, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.create_server((addr, port))
print("listening", flush=True)

def session(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = c.makefile("rb")
    c.sendall(b"220 split-227 test server\r\n")
    data_ls = None
    for raw in f:
        cmd = raw.strip().split(b" ")[0].upper()
        if cmd in (b"USER", b"PASS", b"TYPE"):
            c.sendall(b"230 ok\r\n" if cmd == b"PASS" else b"331 ok\r\n" if cmd == b"USER" else b"200 ok\r\n")
        elif cmd == b"PASV":
            data_ls = socket.create_server((addr, 0))
            p = data_ls.getsockname()[1]
            reply = f"227 Entering Passive Mode ({addr.replace('.', ',')},{p >> 8},{p & 255}).\r\n".encode()
            c.sendall(reply[:31])
            time.sleep(0.05)
            c.sendall(reply[31:])
        elif cmd == b"RETR":
            c.sendall(b"150 here it comes\r\n")
            d, _ = data_ls.accept()
            with open(root + "/big.bin", "rb") as src:
                d.sendall(src.read())
            d.close()
            c.sendall(b"226 done\r\n")
        elif cmd == b"QUIT":
            c.sendall(b"221 bye\r\n")
            break
        else:
            c.sendall(b"502 no\r\n")

while True:
    c, _ = srv.accept()
    try:  # a peer gone early (the lab's readiness probe connects and closes) must not end the server
        session(c)
    except OSError:
        pass
    finally:
        c.close()
"""


def test_227_split_by_a_server_behind_dnat_is_rewritten(lab):
    """A server behind gw2's DNAT writes its 227 in two segments; the client (trusting the
    227 address) gets the public address and the transfer works."""
    public, inside, port = PUBLIC_OF["pyftpdlib"], INSIDE_SERVERS["pyftpdlib"], 2100
    rules = [("nat", ["PREROUTING", "-d", public, "-p", "tcp", "--dport", str(port), "-j", "DNAT",
                      "--to-destination", f"{inside}:{port}"]),
             ("filter", ["FORWARD", "-d", inside, "-p", "tcp", "--dport", str(port), "-m", "conntrack",
                         "--ctstate", "DNAT", "-j", "ACCEPT"])]
    server = lab.popen(lab.inside, [sys.executable, "-c", SPLIT_227_SERVER, inside, str(port), str(lab.files)])
    for table, r in rules:
        lab.ns(lab.gw2, ["iptables", "-t", table, "-I", *r])
    path = lab.state / "split-227.pcap"
    try:
        lab.wait_port(lab.inside, inside, port)
        cap = lab.capture(lab.server, "s1", path, bpf=f"tcp port {port}")
        p = lab.start_ftpalg("--control-port", str(port), gw=lab.gw2)
        try:
            res = lab.ns(lab.server, [sys.executable, "-c", textwrap.dedent(f"""
                import ftplib, hashlib
                ftp = ftplib.FTP(timeout=10)
                ftp.trust_server_pasv_ipv4_address = True
                ftp.connect("{public}", {port}, source_address=("{OUTSIDE_CLIENTS[0]}", 0))
                ftp.login()
                h = hashlib.sha256()
                ftp.retrbinary("RETR big.bin", h.update)
                print(h.hexdigest())
                ftp.quit()
            """)], check=False, timeout=60)
        finally:
            rc = lab.stop_ftpalg(p)
            Lab.stop_capture(cap)
        assert rc == 0
        assert res.returncode == 0 and res.stdout.strip() == sha256(lab.files / "big.bin"), \
            (res.stderr[-1500:], lab.ftpalg_log(lab.gw2)[-2000:])
        seen = wire(lab, path, b"227")
        assert seen and all(public.replace(".", ",").encode() in s for s in seen), seen
        assert "lines_assembled=1" in lab.ftpalg_log(lab.gw2)
    finally:
        for table, r in rules:
            lab.ns(lab.gw2, ["iptables", "-t", table, "-D", *r])
        server.kill()
        server.wait(10)
        lab.procs.remove(server)
