"""``ftpalg explain``: the committed lab captures (tests/data/explain/, made by its
record.py as root) explained offline, no root needed. Failing active and passive sessions
must name the private address and the fix; the session with ftpalg running must say the
transfers worked; FTPS must say nothing can be said; bad input must fail cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.utils import PcapNgWriter, rdpcap, wrpcap

from ftpalg.cli import main
from ftpalg.explain import explain, read_capture

DATA = Path(__file__).resolve().parent / "data" / "explain"
SVG = "{http://www.w3.org/2000/svg}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["explain", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def diagnoses(out: str) -> list[str]:
    return [line.strip()[2:] for line in out.splitlines() if line.startswith("    - ")]


# ---- failing active mode: client 10.0.0.2 behind gw (MASQUERADE to 203.0.113.1) --------------

def test_active_inside_names_private_address_and_fix(capsys):
    rc, out, _ = run(capsys, str(DATA / "active-fail-inside.pcap"))
    assert rc == 1
    assert "captured on the client's side of a NAT gateway" in out
    assert "unknown, give it with --public ADDR" in out
    d = diagnoses(out)
    assert len(d) == 2
    assert d[0].startswith("PORT names 10.0.0.2:45349, a private address: the server (203.0.113.2) cannot reach it")
    assert "the server refused it (500 Illegal PORT command.)" in d[0]
    assert "the gateway needs an FTP ALG: ftpalg would rewrite it to <public>:45349 and open a pinhole for " \
           "203.0.113.2" in d[0]
    assert "500 I won't open a connection to 10.0.0.2 (only to 203.0.113.1)" in d[1]
    assert "rewritten: PORT <public>,177,37" in out


def test_active_inside_with_public_address(capsys):
    rc, out, _ = run(capsys, str(DATA / "active-fail-inside.pcap"), "--public", "203.0.113.1")
    assert rc == 1
    assert "rewritten: PORT 203,0,113,1,177,37" in out
    assert "ftpalg would rewrite it to 203.0.113.1:45349" in out
    assert "<public>" not in out


def test_active_outside_infers_client_behind_nat(capsys):
    rc, out, _ = run(capsys, str(DATA / "active-fail-outside.pcap"))
    assert rc == 1
    assert "the client appears as 203.0.113.1 but announces 10.0.0.2: it is behind a NAT gateway" in out
    d = diagnoses(out)
    assert d[0].startswith("PORT names 10.0.0.2:45349, a private address: the server (203.0.113.2) cannot reach it")
    assert "ftpalg would rewrite it to 203.0.113.1:45349 and open a pinhole for 203.0.113.2" in d[0]


def test_active_json(capsys):
    rc, out, _ = run(capsys, str(DATA / "active-fail-inside.pcap"), "--json")
    assert rc == 1
    doc = json.loads(out)
    assert doc["failed"] is True
    s = doc["sessions"][0]
    assert s["user"] == "anonymous" and s["verdict"] == "failed"
    assert s["mapping"] == {"client": "10.0.0.2", "public": "203.0.113.2", "server": "203.0.113.2",
                            "client_seen": None}
    a = s["announcements"][0]
    assert (a["form"], a["addr"], a["port"], a["private"]) == ("PORT", "10.0.0.2", 45349, True)
    assert a["ftpalg"]["action"] == "rewrite"
    assert a["ftpalg"]["rewritten"] == "PORT <public>,177,37"
    assert a["server_reply"] == {"code": 500, "text": "500 Illegal PORT command."}
    assert a["ok"] is False
    assert "private_address" in a["problems"] and "server_refused_announcement" in a["problems"]
    assert s["core_counters"]["pinholes_opened"] == 1  # the core's own count


# ---- failing passive mode: client 203.0.113.100 -> gw2 (DNAT of tcp/21) -> server 10.1.0.2 ----

def test_passive_outside_names_private_address_and_fix(capsys):
    rc, out, _ = run(capsys, str(DATA / "passive-fail-outside.pcap"))
    assert rc == 1
    assert "the server is behind a DNAT gateway (198.51.100.2:21 -> 10.1.0.2:21), captured outside it" in out
    d = diagnoses(out)
    assert len(d) == 3
    # ftplib trusts the 227 address: its connect fails before any SYN leaves
    assert d[0].startswith("227 names 10.1.0.2:56319 (private): the client (203.0.113.100) connects to an "
                           "unreachable address; no data connection attempt seen")
    assert "the gateway needs an FTP ALG: ftpalg would rewrite it to 198.51.100.2:56319 and open a pinhole for " \
           "203.0.113.100" in d[0]
    # curl tries EPSV, then PASV (ignoring the 227 address): gw2 refuses both ports
    assert d[1].startswith("229 names port 54376")
    assert "SYN answered by RST" in d[1] and "the gateway does not forward port 54376 to the server (10.1.0.2)" in d[1]
    assert "ftpalg would open a pinhole for 203.0.113.100 to 198.51.100.2:54376, sent on to 10.1.0.2:54376" in d[1]
    assert d[2].startswith("227 names 10.1.0.2:27902 (private)")
    assert "rewritten: 227 Entering Passive Mode (198,51,100,2,219,255)." in out


def test_passive_inside_infers_server_behind_dnat(capsys):
    rc, out, _ = run(capsys, str(DATA / "passive-fail-inside.pcap"), "--public", "198.51.100.2")
    assert rc == 1
    assert "captured on the server's side of a DNAT gateway" in out
    d = diagnoses(out)
    assert d[0].startswith("227 names 10.1.0.2:56319 (private): a client outside cannot reach it (it knows the "
                           "server as 198.51.100.2); no data connection reached this side of the gateway")
    assert "ftpalg would rewrite it to 198.51.100.2:56319" in d[0]
    assert "the gateway forwards only the control port, not 198.51.100.2:54376" in d[1]


def test_passive_json_data_connections(capsys):
    rc, out, _ = run(capsys, str(DATA / "passive-fail-outside.pcap"), "--json")
    doc = json.loads(out)
    anns = doc["sessions"][1]["announcements"]
    assert [a["form"] for a in anns] == ["EPSV", "PASV"]
    assert [c["status"] for a in anns for c in a["data_connections"]] == ["refused", "refused"]
    assert anns[1]["data_connections"][0]["to"] == "198.51.100.2:27902"
    assert doc["sessions"][0]["announcements"][0]["problems"] == ["private_address", "no_data_connection"]


# ---- working, refused by policy, encrypted ---------------------------------------------------

def test_good_session_says_transfers_worked(capsys):
    rc, out, _ = run(capsys, str(DATA / "good-inside.pcap"), "--public", "203.0.113.1")
    assert rc == 0
    assert out.count("[OK]") == 2 and "FAILED" not in out
    assert diagnoses(out) == ["nothing wrong: 2 data connections worked"] * 2
    assert "data: 203.0.113.2:20 -> 10.0.0.2:35269: connected (SYN, SYN/ACK), 1000 bytes" in out
    assert "RETR small.txt: 226 Transfer complete." in out
    assert "a gateway translated it and let the connection through" not in out  # said per announcement only
    doc = json.loads(run(capsys, str(DATA / "good-inside.pcap"), "--json")[1])
    assert all(a["ok"] for s in doc["sessions"] for a in s["announcements"])
    assert doc["failed"] is False


def test_min_port_refusal_comes_from_the_core(capsys):
    rc, out, _ = run(capsys, str(DATA / "good-inside.pcap"), "--min-port", "60000")
    assert rc == 0  # the transfers did work (ftpalg ran with the default policy)
    assert "ftpalg: port 43001 is below 60000 (--min-port): a service port, not a data port" in out
    assert "refused=2" in out


def test_ftps(capsys):
    rc, out, _ = run(capsys, str(DATA / "ftps-inside.pcap"))
    assert rc == 0
    assert "[ENCRYPTED]" in out
    assert "AUTH TLS: control channel encrypted after packet 8 — nothing can be said about transfers" in out
    assert "encrypted=1" in out  # the core counted it too


def _crafted_port25(path: Path) -> None:
    """Client 10.0.0.2 behind NAT: PORT to its port 25, the server's SYN is not answered, 425."""
    c, s, t = "10.0.0.2", "203.0.113.2", 1000.0
    cs, ss = 1000, 5000
    pkts = []

    def add(src_is_client: bool, flags: str, payload: bytes = b"") -> None:
        nonlocal cs, ss, t
        t += 0.01
        if src_is_client:
            p = IP(src=c, dst=s) / TCP(sport=40000, dport=21, seq=cs, ack=ss, flags=flags) / payload
            cs += len(payload) + (1 if "S" in flags or "F" in flags else 0)
        else:
            p = IP(src=s, dst=c) / TCP(sport=21, dport=40000, seq=ss, ack=cs, flags=flags) / payload
            ss += len(payload) + (1 if "S" in flags or "F" in flags else 0)
        p.time = t
        pkts.append(p)

    add(True, "S")
    add(False, "SA")
    add(True, "A")
    add(False, "PA", b"220 hi\r\n")
    add(True, "PA", b"USER bob\r\n")
    add(False, "PA", b"331 pw\r\n")
    add(True, "PA", b"PASS x\r\n")
    add(False, "PA", b"230 ok\r\n")
    add(True, "PA", b"PORT 10,0,0,2,0,25\r\n")
    add(False, "PA", b"200 PORT ok\r\n")
    add(True, "PA", b"RETR f\r\n")
    for i in range(3):
        syn = IP(src=s, dst=c) / TCP(sport=20, dport=25, seq=9, flags="S")
        syn.time = t + 0.1 + i
        pkts.append(syn)
    t += 4
    add(False, "PA", b"425 Can't open data connection.\r\n")
    wrpcap(str(path), pkts)


def test_refused_port_and_425(capsys, tmp_path):
    path = tmp_path / "port25.pcap"
    _crafted_port25(path)
    rc, out, _ = run(capsys, str(path), "--public", "203.0.113.1")
    assert rc == 1
    assert "user bob" in out
    d = diagnoses(out)
    assert len(d) == 1
    assert d[0].startswith("PORT names 10.0.0.2:25, a private address")
    assert "data connection 203.0.113.2:20 -> 10.0.0.2:25: SYN not answered (3 sent" in d[0]
    assert "server answered 425 Can't open data connection." in d[0]
    assert "port 25 refused by policy (--min-port)" in d[0]
    assert "PASS x" not in out


def test_pcapng_reads_the_same(tmp_path):
    src = DATA / "active-fail-inside.pcap"
    ng = tmp_path / "a.pcapng"
    with PcapNgWriter(str(ng)) as w:
        for p in rdpcap(str(src)):
            w.write(p)
    a, b = read_capture(src), read_capture(ng)
    assert [x[2] for x in a] == [x[2] for x in b]
    assert [round(x[1], 6) for x in a] == [round(x[1], 6) for x in b]
    ra, rb = explain(src), explain(ng)
    assert [s.diagnosis for s in ra.sessions] == [s.diagnosis for s in rb.sessions]


# ---- the picture -------------------------------------------------------------------------------

def test_svg_lanes(capsys, tmp_path):
    svg = tmp_path / "t.svg"
    rc, _, _ = run(capsys, str(DATA / "passive-fail-outside.pcap"), "--svg", str(svg))
    assert rc == 1
    root = ET.parse(svg).getroot()
    assert root.tag == f"{SVG}svg"
    lanes = {g.get("id"): g.get("class") for g in root.iter(f"{SVG}g")}
    assert lanes == {"control-1": "lane control", "control-2": "lane control",
                     "data-1": "lane data refused", "data-2": "lane data refused"}
    assert len([e for e in root.iter(f"{SVG}circle") if e.get("class") == "announcement"]) == 3
    assert len([e for e in root.iter(f"{SVG}line") if e.get("class") == "link"]) == 2
    texts = "".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "✗ no data connection" in texts and "PASS" not in texts.replace("PASS ****", "")


def test_svg_good_is_green(capsys, tmp_path):
    svg = tmp_path / "g.svg"
    run(capsys, str(DATA / "good-inside.pcap"), "--svg", str(svg))
    root = ET.parse(svg).getroot()
    data = [g for g in root.iter(f"{SVG}g") if "data" in (g.get("class") or "")]
    assert len(data) == 4 and all(g.get("class") == "lane data ok" for g in data)
    assert all(ln.get("stroke") == "#2e8b57" for g in data for ln in g.iter(f"{SVG}line"))


# ---- bad input ---------------------------------------------------------------------------------

def test_not_a_pcap(capsys, tmp_path):
    p = tmp_path / "x.pcap"
    p.write_text("hello, not a capture\n")
    rc, out, err = run(capsys, str(p))
    assert rc == 2 and out == ""
    assert "not a pcap or pcapng file" in err and "Traceback" not in err


def test_missing_file(capsys, tmp_path):
    rc, _, err = run(capsys, str(tmp_path / "nope.pcap"))
    assert rc == 2 and "No such file or directory" in err


def test_empty_pcap(capsys, tmp_path):
    p = tmp_path / "e.pcap"
    wrpcap(str(p), [])
    rc, _, err = run(capsys, str(p))
    assert rc == 2 and "holds no packets" in err


def test_truncated_header(capsys, tmp_path):
    p = tmp_path / "t.pcap"
    p.write_bytes((DATA / "good-inside.pcap").read_bytes()[:10])
    rc, _, err = run(capsys, str(p))
    assert rc == 2 and "truncated pcap header" in err


def test_non_ftp_traffic(capsys, tmp_path):
    p = tmp_path / "http.pcap"
    wrpcap(str(p), [IP(src="10.0.0.2", dst="203.0.113.2") / TCP(sport=40000, dport=80, flags="S"),
                    IP(src="203.0.113.2", dst="10.0.0.2") / TCP(sport=80, dport=40000, flags="SA")])
    rc, out, err = run(capsys, str(p))
    assert rc == 2 and out == ""
    assert "no FTP control connection found (TCP port 21; another port: --control-port)" in err


def test_other_control_port(capsys, tmp_path):
    """The same session on port 2121 is found only with --control-port 2121."""
    pkts = rdpcap(str(DATA / "active-fail-inside.pcap"))
    for p in pkts:
        for f in ("sport", "dport"):
            if getattr(p[TCP], f) == 21:
                setattr(p[TCP], f, 2121)
        del p[TCP].chksum
    path = tmp_path / "p2121.pcap"
    wrpcap(str(path), pkts)
    assert run(capsys, str(path))[0] == 2
    rc, out, _ = run(capsys, str(path), "--control-port", "2121")
    assert rc == 1 and "PORT names 10.0.0.2:45349, a private address" in out


def test_bad_public(capsys):
    rc, _, err = run(capsys, str(DATA / "good-inside.pcap"), "--public", "gateway")
    assert rc == 2 and "not an IP address" in err


def test_console_script_no_traceback(tmp_path):
    p = tmp_path / "x.pcap"
    p.write_bytes(b"\0" * 3)
    res = subprocess.run([sys.executable, "-m", "ftpalg", "explain", str(p)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert "too short" in res.stderr and "Traceback" not in res.stderr
