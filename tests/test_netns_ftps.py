"""FTPS (explicit TLS, RFC 4217) through ftpalg, with real servers and clients in the lab.

Once a client's AUTH gets 234 ftpalg must stop reading the connection (its bytes are TLS),
open nothing, leave the bytes alone, keep the kernel's sequence corrections it made before
in force, and say once per process what the admin can do instead. An AUTH that is refused
changes nothing: the session goes on in clear and ftpalg helps as usual.

The FTPS server is a TLS vsftpd on its own outside address (``ftpalg.lab.tls``); the clients
are inside, behind gw1's MASQUERADE, where passive mode works without an ALG: those tests are
about ftpalg not breaking FTPS (downloads, a PORT rewritten before AUTH whose sequence shift
must outlive the switch to TLS and a restart of ftpalg), and about what it cannot do (an
encrypted PORT reaches the server unrewritten and is refused, at once). The last test checks
the advice of ftpalg's warning on a server behind gw2's DNAT: pasv_address plus a forwarded
passive range make FTPS work there, and nothing else does.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import rdpcap

from ftpalg.lab.lab import CLIENTS, GW_PUBLIC, OUTSIDE_CLIENTS, SERVERS, Lab, sha256
from ftpalg.lab.tls import PASV_RANGE, PUBLIC_TLS_SERVER, TlsServer, start_dnat_tls_server, start_tls_server
from netns_checks import no_pinholes_soon

pytestmark = pytest.mark.netns

FILE = "big.bin"
WARNING = "AUTH accepted (234)"
TIMEOUT = 20  # seconds any one client may take; a wedged control connection fails by it
CURLE_FTP_PORT_FAILED = 30  # curl's exit status when the server refuses its active-mode command (28: timed out)


@pytest.fixture(scope="module")
def ftps(lab: Lab):
    server = start_tls_server(lab)
    yield server
    server.stop()
    assert not server.session_pids()  # no vsftpd session left behind
    assert not server.state.exists()
    assert f" {server.addr}/" not in lab.ns(lab.server, ["ip", "-o", "addr", "show"]).stdout


class RunningAlg:
    """``ftpalg run`` in a gateway (gw1 by default) for one test; ``stop()`` ends it, checks
    it exited cleanly and left the ruleset as found, and returns its log."""

    def __init__(self, lab: Lab, gw: str | None = None) -> None:
        self.lab, self.gw = lab, gw
        self.before = lab.ruleset(gw)
        self.proc: subprocess.Popen[bytes] | None = lab.start_ftpalg(gw=gw)

    def stop(self) -> str:
        if self.proc is not None:
            rc = self.lab.stop_ftpalg(self.proc)
            self.proc = None
            log = self.lab.ftpalg_log(self.gw)
            assert rc == 0, log
            assert self.lab.ruleset(self.gw) == self.before
            assert "Traceback" not in log
        return self.lab.ftpalg_log(self.gw)

    def counters(self) -> dict[str, int]:
        """The counters ftpalg logs at exit (stops it first)."""
        m = re.search(r"counters: (.*)$", self.stop(), re.M)
        assert m, self.lab.ftpalg_log(self.gw)
        return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split() if "=" in kv)}


@pytest.fixture
def alg(lab: Lab):
    a = RunningAlg(lab)
    yield a
    a.stop()


def warnings_of(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line and WARNING in line]


def encrypted_flows(log: str) -> list[str]:
    """The flows ftpalg logged as switched to TLS."""
    return re.findall(r"INFO encrypted flow=(\S+): control connection switched to TLS", log)


def run_client(lab: Lab, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A client in the inside namespace; one that hangs past TIMEOUT (plus a margin for its
    own timeouts to fire) fails the test (subprocess.TimeoutExpired)."""
    return lab.ns(lab.client, argv, check=False, timeout=TIMEOUT + 5)


def curl_ftps(server: TlsServer, out: Path) -> list[str]:
    return ["curl", "-sSv", "--ssl-reqd", "--insecure", "--max-time", str(TIMEOUT), "-o", str(out),
            f"ftp://{server.addr}/{FILE}"]


def lftp_ftps(server: TlsServer, out: Path) -> list[str]:
    # lftp skips TLS for anonymous logins unless told otherwise, even with ssl-force.
    script = ("set ftp:ssl-force true; set ftp:ssl-allow-anonymous true; set ftp:ssl-protect-data true; "
              "set ssl:verify-certificate no; set ftp:passive-mode on; set net:max-retries 1; "
              f"set net:timeout 10; set xfer:clobber on; debug 5; get {FILE} -o {out}; bye")
    return ["lftp", "-e", script, f"ftp://{server.addr}"]


def test_ftps_passive_downloads_pass_untouched(lab, ftps, alg):
    """curl and lftp, each on its own control connection: AUTH, 234, TLS, PROT P, a passive
    download; ftpalg sees both switch to TLS, warns once, opens nothing."""
    want = sha256(lab.files / FILE)
    # what each client prints (-v, debug 5) of what it sends (">") and receives ("<")
    dialects = {"curl": ("> ", "< "), "lftp": ("---> ", "<--- ")}
    for name, argv in (("curl", curl_ftps), ("lftp", lftp_ftps)):
        out = lab.state / f"ftps-{name}.bin"
        out.unlink(missing_ok=True)
        p = run_client(lab, argv(ftps, out))
        assert p.returncode == 0, f"{name}: {p.stderr[-3000:]}"
        assert sha256(out) == want, name
        sent, got = dialects[name]
        said = p.stderr.splitlines()
        for want_line in (f"{sent}AUTH ", f"{got}234 ", f"{sent}PROT P", f"{got}200 PROT now Private",
                          f"{got}226 "):
            assert any(line.startswith(want_line) for line in said), f"{name}: no {want_line!r}: {p.stderr[-3000:]}"
        if name == "lftp":  # the control connection still answers after the transfer
            assert f"{got}221 " in p.stderr, p.stderr[-3000:]
        assert not lab.expectations(), lab.expectations()
    log = alg.stop()
    (warning,) = warnings_of(log)  # once per ftpalg process, not per connection
    assert "pasv_address" in warning and "passive" in warning  # says what the admin can do instead
    flows = encrypted_flows(log)
    assert len(flows) == 2 and len(set(flows)) == 2, log  # one info line per control connection
    assert all(f.startswith(f"{CLIENTS[0]}:") and f.endswith(f">{ftps.addr}:21") for f in flows), flows
    assert "pinhole open" not in log
    for bad in ("malformed", "unsolicited", "partial_line", "resync", "gap flow="):
        assert bad not in log, log
    c = alg.counters()
    assert c.get("encrypted") == 2 and c.get("pinholes_opened", 0) == 0 and c.get("rewrites", 0) == 0, c


def test_ftps_active_mode_fails_cleanly(lab, ftps, alg):
    """What ftpalg cannot do: an encrypted PORT/EPRT reaches the server with the client's
    private address, unread; the server refuses it at once (no pinhole, nothing hangs)."""
    out = lab.state / "ftps-active.bin"
    p = run_client(lab, ["curl", "-sSv", "--ssl-reqd", "--insecure", "--ftp-port", "-", "--max-time",
                         str(TIMEOUT), "-o", str(out), f"ftp://{ftps.addr}/{FILE}"])
    assert p.returncode == CURLE_FTP_PORT_FAILED, p.stderr[-3000:]  # refused, not timed out (28)
    assert "< 234" in p.stderr, p.stderr[-3000:]
    assert f"> EPRT |1|{CLIENTS[0]}|" in p.stderr and "< 500 Illegal EPRT" in p.stderr, p.stderr[-3000:]
    assert not lab.expectations()
    log = alg.stop()
    assert "INFO pinhole open" not in log and len(encrypted_flows(log)) == 1, log
    c = alg.counters()
    assert c.get("encrypted") == 1 and c.get("rewrites", 0) == 0 and c.get("pinholes_opened", 0) == 0, c


CORRECTED_SESSION = textwrap.dedent("""
    import ftplib, hashlib, ssl, sys
    host, me, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ftp = ftplib.FTP_TLS(context=ctx, timeout=10)
    print(ftp.connect(host, 21, source_address=(me, 0)), flush=True)
    # before login, in clear: ftpalg rewrites it to the gateway's public address (longer)
    port_cmd = "PORT %s,%d,%d" % (me.replace(".", ","), port >> 8, port & 255)
    try:
        print("PORT:", ftp.sendcmd(port_cmd), flush=True)
    except ftplib.Error as e:
        print("PORT:", e, flush=True)
    print("AUTH:", ftp.auth(), flush=True)
    print("TLS:", ftp.sock.version(), flush=True)
    print("LOGIN:", ftp.login(), flush=True)
    print("PROT:", ftp.prot_p(), flush=True)
    h = hashlib.sha256()
    print("RETR:", ftp.retrbinary("RETR " + name, h.update), flush=True)
    print("SHA256:", h.hexdigest(), flush=True)
    print("NOOP:", ftp.voidcmd("NOOP"), flush=True)
    print("QUIT:", ftp.quit(), flush=True)
""")


def control_segments(path: Path, client_side: bool) -> list[tuple[int, bool, bytes]]:
    """(seq relative to the sender's SYN, from the client?, payload) of each segment with
    payload of the one control connection in a capture."""
    isn: dict[bool, int] = {}
    out = []
    for pkt in rdpcap(str(path)):
        if IP not in pkt or TCP not in pkt:
            continue
        tcp = pkt[TCP]
        from_client = tcp.dport == 21
        if tcp.flags & 0x02:  # SYN
            isn[from_client] = tcp.seq
        payload = bytes(tcp.payload)
        if payload and from_client in isn:
            out.append(((tcp.seq - isn[from_client]) & 0xFFFFFFFF, from_client, payload))
    assert isn, f"no SYN in {path} ({'inside' if client_side else 'outside'})"
    return out


def stream_after(segs: list[tuple[int, bool, bytes]], from_client: bool, start: int) -> bytes:
    """The bytes a sender sent from relative seq ``start`` on (retransmissions folded)."""
    data: dict[int, int] = {}
    for seq, fc, payload in segs:
        if fc == from_client:
            for i, b in enumerate(payload):
                if seq + i >= start:
                    data.setdefault(seq + i, b)
    return bytes(data[k] for k in sorted(data))


def test_corrections_made_before_auth_stay_in_force(lab, ftps, alg):
    """A PORT rewritten before AUTH (private -> public address: 3 bytes longer) shifts the
    client's sequence numbers; TLS then runs over the same connection. The handshake and a
    PROT P download only work if the kernel keeps shifting every later segment, and the TLS
    bytes must cross the gateway unchanged."""
    me, port = CLIENTS[0], 41234
    inside, outside = lab.state / "ftps-gi.pcap", lab.state / "ftps-go.pcap"
    bpf = f"tcp port 21 and host {ftps.addr}"
    caps = [lab.capture(lab.gw, "gi", inside, bpf), lab.capture(lab.gw, "go", outside, bpf)]
    try:
        p = run_client(lab, [sys.executable, "-c", CORRECTED_SESSION, ftps.addr, me, str(port), FILE])
    finally:
        for c in caps:
            Lab.stop_capture(c)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines() if ": " in line)
    assert lines["PORT"][:3] in ("200", "500", "501", "530"), p.stdout  # refused before login, or taken
    assert lines["AUTH"].startswith("234") and lines["TLS"].startswith("TLS"), p.stdout
    assert lines["SHA256"] == sha256(lab.files / FILE), p.stdout
    assert lines["RETR"].startswith("226") and lines["NOOP"].startswith("200"), p.stdout

    log = alg.stop()
    priv, pub = me.replace(".", ","), GW_PUBLIC.replace(".", ",")
    rewrite = re.search(rf"pinhole open .* b'PORT {priv},(\d+),(\d+)' -> b'PORT {pub},(\d+),(\d+)'", log)
    assert rewrite, log
    assert int(rewrite[1]) * 256 + int(rewrite[2]) == port
    assert len(warnings_of(log)) == 1 and len(encrypted_flows(log)) == 1, log
    c = alg.counters()
    assert c.get("rewrites") == 1 and c.get("encrypted") == 1, c
    assert no_pinholes_soon(lab)

    # On the wire: the same bytes on both sides of the gateway, shifted by the rewrite.
    delta = len(pub) - len(priv)
    segs_in, segs_out = control_segments(inside, True), control_segments(outside, False)
    (auth_in,) = [s for s, fc, pl in segs_in if fc and pl.startswith(b"AUTH ")]
    (auth_out,) = [s for s, fc, pl in segs_out if fc and pl.startswith(b"AUTH ")]
    assert auth_out - auth_in == delta  # the kernel shifts the client's seq past the rewrite
    tls_in = stream_after(segs_in, True, auth_in)
    tls_out = stream_after(segs_out, True, auth_out)
    assert tls_in.startswith(b"AUTH TLS\r\n") and tls_in[10:11] == b"\x16", tls_in[:16]  # then a TLS handshake
    assert tls_in == tls_out  # client -> server: not a byte of the TLS stream changed
    (reply_in,) = [s for s, fc, pl in segs_in if not fc and pl.startswith(b"234")]
    (reply_out,) = [s for s, fc, pl in segs_out if not fc and pl.startswith(b"234")]
    assert stream_after(segs_in, False, reply_in) == stream_after(segs_out, False, reply_out)
    assert b"PORT " + pub.encode() in b"".join(pl for _, fc, pl in segs_out if fc)  # the server saw the rewrite


RESTART_SESSION = textwrap.dedent("""
    import ftplib, hashlib, ssl, sys
    host, me, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ftp = ftplib.FTP_TLS(context=ctx, timeout=10)
    ftp.connect(host, 21, source_address=(me, 0))
    try:
        ftp.sendcmd("PORT %s,%d,%d" % (me.replace(".", ","), port >> 8, port & 255))
    except ftplib.Error:
        pass
    ftp.auth()
    ftp.login()
    print("READY", flush=True)
    input()  # ftpalg restarts meanwhile
    print("NOOP:", ftp.voidcmd("NOOP"), flush=True)
    print("PROT:", ftp.prot_p(), flush=True)
    h = hashlib.sha256()
    print("RETR:", ftp.retrbinary("RETR " + name, h.update), flush=True)
    print("SHA256:", h.hexdigest(), flush=True)
    print("QUIT:", ftp.quit(), flush=True)
""")


def test_ftps_session_survives_an_ftpalg_restart(lab, ftps, alg):
    """Corrections made before AUTH live in the kernel: a TLS session goes on after ftpalg
    restarts (the new process picks the connection up mid-stream, its bytes are TLS)."""
    me, port = CLIENTS[0], 41235
    p = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", RESTART_SESSION, ftps.addr, me,
                          str(port), FILE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdin is not None and p.stdout is not None
    try:
        assert p.stdout.readline().strip() == "READY"
        first = alg.stop()
        hp = f"{port >> 8},{port & 255}"
        priv, pub = me.replace(".", ","), GW_PUBLIC.replace(".", ",")
        assert f"b'PORT {priv},{hp}' -> b'PORT {pub},{hp}'" in first, first  # 3 bytes longer
        assert len(encrypted_flows(first)) == 1
        second = RunningAlg(lab)
        try:
            p.stdin.write("\n")
            p.stdin.flush()
            out, err = p.communicate(timeout=TIMEOUT)
        finally:
            log = second.stop()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out + err
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["NOOP"].startswith("200") and lines["RETR"].startswith("226"), out
    assert lines["SHA256"] == sha256(lab.files / FILE)
    assert "INFO pinhole open" not in log and "Traceback" not in log, log


REFUSED_SESSION = textwrap.dedent("""
    import ftplib, hashlib, socket, sys
    host, me, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(host, 21, source_address=(me, 0))
    for how in ("TLS", "SSL"):
        try:
            print("AUTH", how, "taken:", ftp.sendcmd("AUTH " + how), flush=True)
            sys.exit(3)
        except ftplib.error_perm as e:
            print("AUTH", how, "refused:", e, flush=True)
    print("LOGIN:", ftp.login(), flush=True)
    ftp.voidcmd("TYPE I")
    ls = socket.create_server((me, port))
    print("PORT:", ftp.sendport(me, port), flush=True)  # the private address: ftpalg rewrites it
    print("RETR1:", ftp.sendcmd("RETR " + name), flush=True)  # on our listener: not ftplib's makeport
    h = hashlib.sha256()
    c, _ = ls.accept()
    c.settimeout(10)
    while chunk := c.recv(65536):
        h.update(chunk)
    c.close()
    print("RETR:", ftp.voidresp(), flush=True)
    print("SHA256:", h.hexdigest(), flush=True)
    print("QUIT:", ftp.quit(), flush=True)
""")


@pytest.mark.parametrize("server", ["vsftpd", "proftpd"])
def test_refused_auth_goes_on_in_clear(lab, ftps, alg, server):
    """A server without TLS refuses AUTH (5xx): the client goes on in clear and ftpalg
    rewrites its PORT as usual (an active-mode download through the NAT works)."""
    me, port = CLIENTS[0], 41300
    out = lab.state / f"refused-{server}.bin"
    out.unlink(missing_ok=True)
    # Python ftplib: AUTH TLS and AUTH SSL refused, then PORT.
    p = run_client(lab, [sys.executable, "-c", REFUSED_SESSION, SERVERS[server], me, str(port), FILE])
    assert p.returncode == 0, p.stdout + p.stderr
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines() if ": " in line)
    assert lines["AUTH TLS refused"][:1] == "5" and lines["AUTH SSL refused"][:1] == "5", p.stdout
    assert lines["PORT"].startswith("200") and lines["RETR1"].startswith("150"), p.stdout
    assert lines["RETR"].startswith("226"), p.stdout
    assert lines["SHA256"] == sha256(lab.files / FILE)
    # curl --ssl: tries AUTH SSL and AUTH TLS, falls back to clear, active mode (PORT).
    p = run_client(lab, ["curl", "-sSv", "--ssl", "--ftp-port", "-", "--disable-eprt", "--max-time",
                         str(TIMEOUT), "-o", str(out), f"ftp://{SERVERS[server]}/{FILE}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "> AUTH TLS" in p.stderr and "> PORT " in p.stderr, p.stderr[-3000:]
    assert sha256(out) == sha256(lab.files / FILE)
    assert no_pinholes_soon(lab)

    log = alg.stop()
    assert WARNING not in log and not encrypted_flows(log), log
    pub = GW_PUBLIC.replace(".", ",")
    opened = re.findall(rf"pinhole open .* b'PORT {me.replace('.', ',')},\d+,\d+' -> b'PORT {pub},\d+,\d+'", log)
    assert len(opened) == 2, log  # ftplib's and curl's PORT, after their refused AUTHs
    c = alg.counters()
    assert c.get("encrypted", 0) == 0 and c.get("rewrites") == 2, c


@pytest.mark.parametrize("forwarded", [False, True], ids=["range-not-forwarded", "range-forwarded"])
def test_ftps_server_behind_dnat_needs_what_the_warning_says(lab, forwarded):
    """ftpalg's warning tells the admin of a NATed FTPS server: passive mode, pasv_address and
    a passive port range forwarded. With ftpalg in gw2: without the range forwarded the data
    connection fails (at once, nothing hangs); with it, FTPS works (EPSV and PASV)."""
    before = lab.ruleset(lab.gw2)
    server = start_dnat_tls_server(lab, forward_passive=forwarded)
    try:
        alg = RunningAlg(lab, lab.gw2)
        try:
            for mode in ("EPSV", "PASV"):
                out = lab.state / f"dnat-{mode}.bin"
                out.unlink(missing_ok=True)
                argv = ["curl", "-sSv", "--ssl-reqd", "--insecure", "--connect-timeout", "5", "--max-time",
                        str(TIMEOUT), "--interface", OUTSIDE_CLIENTS[0], "-o", str(out),
                        *(["--disable-epsv"] if mode == "PASV" else []), f"ftp://{PUBLIC_TLS_SERVER}/{FILE}"]
                p = lab.ns(lab.server, argv, check=False, timeout=TIMEOUT + 5)
                said = p.stderr
                assert "< 234 " in said and f"> {mode}" in said, said[-3000:]
                # the control connection, then data (curl falls back from a failed EPSV to PASV)
                tried = [int(t) for t in re.findall(rf"Trying {re.escape(PUBLIC_TLS_SERVER)}:(\d+)", said)]
                assert tried[0] == 21 and len(tried) >= 2, said[-3000:]
                assert all(PASV_RANGE[0] <= t <= PASV_RANGE[1] for t in tried[1:]), tried
                if forwarded:
                    assert p.returncode == 0, said[-3000:]
                    assert sha256(out) == sha256(lab.files / FILE)
                else:
                    assert p.returncode == 7 and "Couldn't connect" in said, said[-3000:]  # refused, not hung
                assert not lab.expectations(lab.gw2)
        finally:
            log = alg.stop()
        assert len(warnings_of(log)) == 1 and len(encrypted_flows(log)) == 2, log
        assert "INFO pinhole open" not in log
    finally:
        server.stop()
    assert lab.ruleset(lab.gw2) == before  # the forwarding is gone again
