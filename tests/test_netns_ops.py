"""Operating ftpalg: `ftpalg status` on a live session, the Prometheus endpoint, the audit
log, all from a running `ftpalg run` in the lab's gateway."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from ftpalg.lab.lab import CLIENTS, GW_PUBLIC, SERVERS, ftpalg_argv, sha256

pytestmark = pytest.mark.netns

FILE = "small.txt"
# An active-mode session that stops after its PORT (the pinhole is open) until told to go on.
HELD_SESSION = textwrap.dedent("""
    import ftplib, hashlib, socket, sys
    host, me = sys.argv[1:3]
    ftp = ftplib.FTP(timeout=10)
    ftp.connect(host, 21, source_address=(me, 0))
    ftp.login("anonymous", "ops@example.net")
    ftp.voidcmd("TYPE I")
    listener = ftp.makeport()  # sends PORT naming our own address
    print("ready", flush=True)
    input()
    ftp.sendcmd("RETR small.txt")
    conn, _ = listener.accept()
    h = hashlib.sha256()
    while chunk := conn.recv(65536):
        h.update(chunk)
    conn.close()
    ftp.voidresp()
    try:
        ftp.retrbinary("RETR no-such-file", lambda b: None)
    except ftplib.error_perm as e:
        print("refused", str(e)[:3], flush=True)
    print(h.hexdigest(), flush=True)
    ftp.quit()
""")
SCRAPE = ("import urllib.request; "
          "print(urllib.request.urlopen('http://127.0.0.1:9121/metrics', timeout=5).read().decode())")


def metric(text: str, name: str) -> float:
    """The value of one sample line (``name`` with its labels, exactly)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")


def test_status_metrics_and_audit_on_a_live_session(lab):
    audit = lab.state / "audit.jsonl"
    p = lab.start_ftpalg("--audit-file", str(audit))
    client = subprocess.Popen(["ip", "netns", "exec", lab.client, sys.executable, "-c", HELD_SESSION,
                               SERVERS["vsftpd"], CLIENTS[0]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    assert client.stdin is not None and client.stdout is not None
    try:
        assert client.stdout.readline().strip() == "ready"
        # the session as `ftpalg status` shows it: user, last command, its correction, its pinhole
        res = lab.ns(lab.gw, [*ftpalg_argv(), "status", "--json"])
        doc = json.loads(res.stdout)
        (flow,) = [f for f in doc["flows"] if f["client"].startswith(CLIENTS[0] + ":")]
        assert flow["server"] == f"{SERVERS['vsftpd']}:21" and flow["user"] == "anonymous"
        assert flow["last_command"] == "PORT" and flow["pinhole"] is not None
        assert flow["corrections"][0] is not None  # 10.0.0.2 -> 203.0.113.1: the PORT line grew
        (hole,) = doc["pinholes"]
        assert hole["id"] == flow["pinhole"] and hole["form"] == "PORT" and hole["from"] == SERVERS["vsftpd"]
        assert hole["to"].startswith(GW_PUBLIC + ":") and hole["dnat"].startswith(CLIENTS[0] + ":")
        assert 0 < hole["expires_in"] <= 120
        human = lab.ns(lab.gw, [*ftpalg_argv(), "status"]).stdout
        assert "anonymous" in human and f"#{hole['id']}" in human and "PORT" in human, human
        # metrics while it runs
        text = lab.ns(lab.gw, [sys.executable, "-c", SCRAPE]).stdout
        assert metric(text, "ftpalg_control_connections") >= 1
        assert metric(text, "ftpalg_pinholes_open") == 1
        assert metric(text, 'ftpalg_rewrites_total{form="PORT"}') == 1
        assert metric(text, "ftpalg_packet_seconds_count") > 0
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().split() == ["refused", "550"]
        assert client.stdout.readline().strip() == sha256(lab.files / FILE)
        assert client.wait(10) == 0
    finally:
        client.kill()
        client.wait()
        rc = lab.stop_ftpalg(p)
    assert rc == 0
    text = lab.ftpalg_log()
    assert "status on unix socket @ftpalg-status" in text and "metrics on http://127.0.0.1:9121/metrics" in text
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    ok, failed = records
    assert ok["user"] == "anonymous" and ok["command"] == "RETR" and ok["path"] == FILE
    assert ok["mode"] == "PORT" and ok["outcome"] == "ok" and ok["code"] == 226
    assert ok["client"].startswith(CLIENTS[0] + ":") and ok["server"] == f"{SERVERS['vsftpd']}:21"
    assert ok["data"].startswith(f"{SERVERS['vsftpd']} -> {GW_PUBLIC}:") and f"-> {CLIENTS[0]}:" in ok["data"]
    assert failed["path"] == "no-such-file" and failed["outcome"] == "failed" and failed["code"] == 550
    # gone with the process: the status socket answers no more
    res = lab.ns(lab.gw, [*ftpalg_argv(), "status"], check=False)
    assert res.returncode == 1 and "no ftpalg run answers" in res.stderr


def test_audit_to_the_log_and_services_off(lab, tmp_path):
    p = lab.start_ftpalg("--audit", "--metrics-listen", "", "--status-socket", "")
    try:
        out = tmp_path / "f"
        res = lab.ns(lab.client, ["curl", "-sS", "--max-time", "10", "-P", "-", "-o", str(out),
                                  f"ftp://{SERVERS['pyftpdlib']}/{FILE}"], check=False)
        assert res.returncode == 0, res.stderr
        assert sha256(out) == sha256(lab.files / FILE)
        st = lab.ns(lab.gw, [*ftpalg_argv(), "status"], check=False)
        assert st.returncode == 1  # no status socket asked for
    finally:
        assert lab.stop_ftpalg(p) == 0
    log = lab.ftpalg_log()
    (line,) = [x for x in log.splitlines() if " AUDIT " in x]
    rec = json.loads(line.split(" AUDIT ", 1)[1])
    assert rec["command"] == "RETR" and rec["mode"] in ("PORT", "EPRT") and rec["outcome"] == "ok"
    assert "metrics on" not in log and "status on" not in log
