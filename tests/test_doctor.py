"""``ftpalg doctor`` (ftpalg/linux/doctor.py, trials.py, ruleset.py).

Without root: the parsers and checks fed recorded rule listings (Docker's and kube-proxy's
forwardings, firewalld's ftp helper, labels), the exit status and the JSON document.

With root, in a lab's gateways (``ip netns exec``, as an admin runs it): the doctor passes in
gw1; it names each problem it is shown, with the exact check, status and fix: the kernel's
ftp helper attached to port 21, the queue number bound by another program, a forwarded
control port not configured (gw2's DNAT 2121 -> 21); the printed fix works; the gateway's
ruleset is as it was (read-only), and no namespace is left behind, also when the doctor is
stopped during its trials."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from needs import need

from ftpalg.config import Config, load_default
from ftpalg.linux import doctor
from ftpalg.linux.doctor import FAIL, INFO, OK, WARN, Check, Live, exit_status
from ftpalg.linux.ruleset import merge, parse_iptables_save, parse_nft

# ---- recorded listings --------------------------------------------------------------------------
DOCKER_NAT = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A DOCKER -i docker0 -j RETURN
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 2121 -j DNAT --to-destination 172.17.0.2:21
-A DOCKER ! -i docker0 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.3:80
COMMIT
*filter
:FORWARD DROP [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""
KUBE_NAT = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-FTP - [0:0]
:KUBE-SEP-A - [0:0]
:KUBE-SEP-B - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.21/32 -p tcp -m comment --comment "ftp/ftp cluster IP" -m tcp --dport 2100 -j KUBE-SVC-FTP
-A KUBE-SVC-FTP -m statistic --mode random --probability 0.5 -j KUBE-SEP-A
-A KUBE-SVC-FTP -j KUBE-SEP-B
-A KUBE-SEP-A -p tcp -m tcp -j DNAT --to-destination 10.244.1.5:21
-A KUBE-SEP-B -p tcp -m tcp -j DNAT --to-destination 10.244.2.7:21
COMMIT
"""
FIREWALLD_NFT = """table inet firewalld { # handle 3
\tct helper helper-ftp-tcp {
\t\ttype "ftp" protocol tcp
\t\tl3proto inet
\t}

\tset allowed { # handle 9
\t\ttype ipv4_addr
\t\telements = { 10.0.0.1 }
\t}

\tchain filter_FORWARD { # handle 10
\t\ttype filter hook forward priority filter + 10; policy drop;
\t\tct state { established, related } accept # handle 51
\t}

\tchain filter_IN_public_allow { # handle 40
\t\ttcp dport 21 ct helper set "helper-ftp-tcp" # handle 77
\t\ttcp dport 22 accept # handle 78
\t}

\tchain nat_PRE_public { # handle 41
\t\ttcp dport 2121 dnat ip to 10.1.0.3:21 # handle 80
\t\tct label set 127 # handle 81
\t}
}
table inet ftpalg { # handle 4
\tchain helper { # handle 1
\t\ttcp dport 21 ct label set 127 # handle 2
\t}
}
"""


def live_of(*parts) -> Live:
    return Live("nf_tables", "iptables v1.8.9 (nf_tables)", merge(parts), [])


def cfg_with(ports=(21,), **gateway) -> Config:
    from ftpalg.cli import option_overrides, parser

    argv = ["doctor"] + [f"--control-port={p}" for p in ports] + [f"--{k.replace('_', '-')}={v}"
                                                                  for k, v in gateway.items()]
    return load_default(None).override(option_overrides(parser().parse_args(argv)))


# ---- without root -------------------------------------------------------------------------------
def test_docker_published_control_port_is_named_with_the_line_to_add():
    live = live_of(parse_iptables_save(DOCKER_NAT, "iptables"))
    c = doctor.check_forwarding(live, cfg_with())
    assert c.status == WARN
    assert "port 2121 is forwarded to control port 21" in c.detail
    assert "--dport 2121 -j DNAT --to-destination 172.17.0.2:21" in c.detail
    assert "control_ports = [21, 2121]" in c.fix and "--control-port 21 --control-port 2121" in c.fix
    assert doctor.check_forwarding(live, cfg_with((21, 2121))).status == OK
    assert doctor.check_related(live).status == OK  # FORWARD DROP, but related accepted
    managers = {c.name: c for c in doctor.check_managers(live, [(4242, "dockerd", "/usr/bin/dockerd -H fd://")])}
    assert managers["manager-docker"].status == INFO
    assert managers["manager-docker"].detail.startswith("chains DOCKER, DOCKER-USER; running here: dockerd (pid 4242)")
    assert managers["manager-firewalld"].status == OK and managers["manager-ufw"].status == OK


def test_kube_proxy_service_port_is_found_through_its_chains():
    c = doctor.check_forwarding(live_of(parse_iptables_save(KUBE_NAT, "iptables")), cfg_with())
    assert c.status == WARN and "port 2100 is forwarded to control port 21" in c.detail
    assert "control_ports = [21, 2100]" in c.fix


def test_firewalld_ftp_helper_labels_and_dnat_in_native_nft():
    rs = parse_nft(FIREWALLD_NFT, skip={"inet ftpalg"})
    assert rs.helpers == {("inet firewalld", "helper-ftp-tcp"): "ftp"}
    live = live_of(rs)
    helper = doctor.check_ftp_helper(live, cfg_with())
    assert helper.status == FAIL and "control port 21" in helper.detail
    assert "nft delete rule inet firewalld filter_IN_public_allow handle 77" in helper.fix
    assert "firewall-cmd --remove-service=ftp" in helper.fix
    assert doctor.check_ftp_helper(live, cfg_with((2121,))).status == OK  # the helper is on 21 only
    labels = doctor.check_labels(live, cfg_with())  # queue = selected: label 127; ours (table ftpalg) skipped
    assert labels.status == FAIL and "label 127" in labels.detail and "handle" not in labels.detail
    assert doctor.check_labels(live, cfg_with(queue="all")).status == OK  # no label used then
    fwd = doctor.check_forwarding(live, cfg_with())
    assert fwd.status == WARN and "dnat ip to 10.1.0.3:21" in fwd.detail
    assert doctor.check_related(live).status == OK


def test_iptables_ftp_helper_rule_and_its_delete_command():
    raw = "*raw\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -m tcp --dport 21 -j CT --helper ftp\nCOMMIT\n"
    c = doctor.check_ftp_helper(live_of(parse_iptables_save(raw, "ip6tables")), cfg_with())
    assert c.status == FAIL
    assert c.fix.startswith("ip6tables -t raw -D PREROUTING -p tcp -m tcp --dport 21 -j CT --helper ftp")
    anywhere = raw.replace("-p tcp -m tcp --dport 21 ", "")  # no port test: every connection
    assert doctor.check_ftp_helper(live_of(parse_iptables_save(anywhere, "iptables")), cfg_with((990,))).status == FAIL


def test_forward_drop_without_related_accept_warns():
    text = "*filter\n:FORWARD DROP [0:0]\n-A FORWARD -i gi -o go -j ACCEPT\nCOMMIT\n"
    c = doctor.check_related(live_of(parse_iptables_save(text, "iptables")))
    assert c.status == WARN and "ESTABLISHED,RELATED -j ACCEPT" in c.fix


def test_queue_owner_found_from_proc_tables():
    queues = "   21  4012     0 2  4016     0     0        0  1\n 2121  -4711     0 2  4016     0     0  0  1\n"
    assert doctor.bound_queues(queues) == {21: 4012}  # a malformed line is skipped
    netlink = ("sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n"
               "0000000000000000 12  4012       00000000 0        0        0     2        0        987654\n"
               "0000000000000000 0   4012       00000000 0        0        0     2        0        111\n")
    assert doctor.netlink_inodes(netlink) == {4012: 987654}
    assert doctor._is_ftpalg_run("/usr/bin/python3 /usr/local/bin/ftpalg run --workers 2")
    assert not doctor._is_ftpalg_run("/srv/ftpalg/.venv/bin/python -c import netfilterqueue")


def test_exit_status_and_json_document():
    checks = [Check("a", OK, "fine"), Check("b", INFO, "note")]
    assert exit_status(checks) == 0
    assert exit_status(checks + [Check("c", WARN, "w", "do x")]) == 3
    assert exit_status(checks + [Check("c", WARN, "w"), Check("d", FAIL, "f", "do y")]) == 1
    doc = json.loads(doctor.render_json(checks + [Check("d", FAIL, "f", "do y")], Config(), ""))
    assert doc["exit_status"] == 1 and doc["verdict"] == "ftpalg run would fail"
    assert doc["counts"] == {"ok": 1, "info": 1, "warn": 0, "fail": 1}
    assert doc["checks"][-1] == {"name": "d", "status": "fail", "detail": "f", "fix": "do y"}
    text = doctor.render_text(checks + [Check("d", FAIL, "f", "do y")])
    assert text.splitlines()[-2] == "FAIL  d  f  => fix: do y"  # one line per check
    assert text.splitlines()[0] == "OK    a  fine"
    assert text.splitlines()[-1] == "ftpalg run would fail (1 ok, 1 info, 0 warn, 1 fail; exit 1)"


def test_stale_scratch_namespaces_are_those_of_dead_doctors():
    from ftpalg.linux.trials import stale

    dead = 4194304 + 1  # above any pid_max
    names = [f"fdoc{dead}-g", f"fdoc{dead}-c", f"fdoc{os.getpid()}-g", f"fdoc{dead}t-gw", "fa1-gw"]
    assert stale("fdoc", names) == [f"fdoc{dead}-g", f"fdoc{dead}-c"]


# ---- in a lab's gateways ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def glab():
    from ftpalg.lab.lab import Lab

    lab = Lab(f"fdoc{os.getpid()}t")
    lab.up(servers=False)
    yield lab
    lab.down()
    assert not lab.exists()


def namespaces() -> set[str]:
    """The namespaces a doctor (or this module) may create: other helpers' labs come and go
    meanwhile on a shared machine."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return {n for n in listed if n.startswith("fdoc")}


def ruleset(ns: str) -> str:
    out = []
    for argv in (["nft", "list", "ruleset"], ["iptables-legacy-save"], ["ip6tables-legacy-save"]):
        p = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True)
        out.append("\n".join(ln for ln in p.stdout.splitlines() if not ln.startswith("#")))
    return "\n".join(out)


def run_doctor(ns: str, *args: str) -> tuple[int, dict[str, Check], str]:
    from ftpalg.lab.lab import ftpalg_argv

    p = subprocess.run(["ip", "netns", "exec", ns, *ftpalg_argv(), "doctor", "--json", *args],
                       capture_output=True, text=True, timeout=120)
    doc = json.loads(p.stdout)
    assert doc["exit_status"] == p.returncode, p.stderr
    return p.returncode, {c["name"]: Check(**c) for c in doc["checks"]}, p.stdout


@pytest.mark.netns
def test_doctor_passes_in_a_lab_gateway_read_only_and_leaves_nothing(glab):
    before_ns, before_rules = namespaces(), ruleset(glab.gw)
    code, checks, text = run_doctor(glab.gw)
    assert namespaces() == before_ns
    assert ruleset(glab.gw) == before_rules  # nothing written in the gateway's namespace
    bad = {n: c for n, c in checks.items() if c.status in (WARN, FAIL)}
    assert code == 0 and not bad, bad
    for name in ("queue-path", "selection", "conntrack-netlink", "carrier-helper", "labels", "expectations",
                 "seqadj", "rules", "iptables-nfqueue", "iptables-u32", "iptables-string", "iptables-bpf",
                 "iptables-connlabel", "nft-helper", "conflict-ftp-helper", "conflict-queue", "forwarded-ports"):
        assert checks[name].status == OK, checks[name]
    assert checks["nft-queue"].status in (INFO, OK)  # this kernel (6.18): not available, not needed
    doc = json.loads(text)
    assert set(doc) == {"version", "config", "scratch_namespaces", "exit_status", "verdict", "counts", "checks"}
    assert len(doc["checks"]) == len(checks)  # names unique
    assert all(set(c) == {"name", "status", "detail", "fix"} and c["status"] in doctor.STATUSES
               for c in doc["checks"])
    assert sum(doc["counts"].values()) == len(checks)


@pytest.mark.netns
def test_several_workers_the_trial_connection_reaches_the_worker_its_labels_name(glab):
    code, checks, _ = run_doctor(glab.gw, "--workers", "3", "--queue", "all")
    assert code == 0, {n: c for n, c in checks.items() if c.status in (WARN, FAIL)}
    assert checks["queue-path"].detail == ("a 'pasv' line to control port 21 reached queue 2123 (the worker its "
                                           "conntrack labels name, of 3) (queue = all)")
    assert checks["conflict-labels"].detail == "labels 120,121 unused by other rules"
    assert "selection" not in checks and checks["iptables-limit"].status == OK


@pytest.mark.netns
def test_kernel_ftp_helper_on_port_21_is_named_and_its_fix_works(glab):
    rule = ["-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--dport", "21", "-j", "CT", "--helper", "ftp"]
    glab.ns(glab.gw, ["iptables", *rule])
    try:
        code, checks, _ = run_doctor(glab.gw, "--no-trials")
        c = checks["conflict-ftp-helper"]
        assert code == 1 and c.status == FAIL, c
        assert "attached to control port 21" in c.detail
        delete = "iptables -t raw -D PREROUTING -p tcp -m tcp --dport 21 -j CT --helper ftp"
        assert c.fix.startswith(delete)
        glab.ns(glab.gw, delete.split())  # the fix as printed
        code, checks, _ = run_doctor(glab.gw, "--no-trials")
        assert code == 0 and checks["conflict-ftp-helper"].status == OK
    finally:
        glab.ns(glab.gw, ["iptables", *[("-D" if a == "-A" else a) for a in rule]], check=False)


BINDER = """
import sys, time
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda p: p.accept())
print("bound", flush=True)
time.sleep(120)
"""


@pytest.mark.netns
def test_queue_bound_by_another_program_is_named(glab):
    p = subprocess.Popen(["ip", "netns", "exec", glab.gw, sys.executable, "-c", BINDER, "2121"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "bound"
        code, checks, _ = run_doctor(glab.gw, "--no-trials")
        c = checks["conflict-queue"]
        assert code == 1 and c.status == FAIL, c
        assert c.detail.startswith(f"queue 2121 is bound by {sys.executable} -c") and f"(pid {p.pid})" in c.detail
        assert c.fix.endswith("queue_num = 2122 in [gateway] (--queue-num 2122)")
        code, checks, _ = run_doctor(glab.gw, "--no-trials", "--queue-num", "2122")
        assert checks["conflict-queue"].status == OK
    finally:
        p.kill()  # ip netns exec execs the binder: this pid is it
        p.wait()


@pytest.mark.netns
def test_forwarded_control_port_not_configured_is_named_with_the_line_to_add(glab):
    code, checks, _ = run_doctor(glab.gw2, "--no-trials")  # gw2 forwards 198.51.100.3:2121 -> 10.1.0.3:21
    c = checks["forwarded-ports"]
    assert code == 3 and c.status == WARN, c
    assert c.detail.startswith("port 2121 is forwarded to control port 21 (`iptables -t nat -A PREROUTING "
                               "-d 198.51.100.3/32 -i go -p tcp -m tcp --dport 2121 -j DNAT "
                               "--to-destination 10.1.0.3:21`)")
    assert c.fix == ("add to [gateway] in /etc/ftpalg/ftpalg.toml (a new file): control_ports = [21, 2121] "
                     "(or --control-port 21 --control-port 2121)")
    assert [n for n, x in checks.items() if x.status in (WARN, FAIL)] == ["forwarded-ports"]
    code, checks, _ = run_doctor(glab.gw2, "--no-trials", "--control-port", "21", "--control-port", "2121")
    assert code == 0 and checks["forwarded-ports"].status == OK


@pytest.mark.netns
def test_without_privileges_nothing_read_is_called_ok(glab):
    """Run as nobody: the rule listings fail, so the checks that read them say they did not
    (never a false "ok"), and no trial runs."""
    from ftpalg.lab.lab import ftpalg_argv

    need(shutil.which("setpriv"), "setpriv (util-linux)")
    p = subprocess.run(["ip", "netns", "exec", glab.gw, "setpriv", "--reuid", "65534", "--regid", "65534",
                        "--clear-groups", "--inh-caps=-all", *ftpalg_argv(), "doctor", "--json"],
                       capture_output=True, text=True, timeout=60)
    doc = json.loads(p.stdout)
    status = {c["name"]: c["status"] for c in doc["checks"]}
    assert p.returncode == 1 == doc["exit_status"]
    assert status["privileges"] == status["ruleset"] == status["trials"] == FAIL
    for name in ("related-accept", "conflict-ftp-helper", "conflict-labels", "forwarded-ports"):
        assert status[name] == WARN
    assert "scratch" not in status


@pytest.mark.netns
def test_stopped_during_its_trials_it_removes_its_namespaces(glab):
    from ftpalg.lab.lab import ftpalg_argv

    before = namespaces()
    left = "fdoc4194305-g"  # as a doctor killed outright would leave it (no pid is that high)
    subprocess.run(["ip", "netns", "add", left], check=True)
    p = subprocess.Popen(["ip", "netns", "exec", glab.gw, *ftpalg_argv(), "doctor"], stdout=subprocess.DEVNULL)
    mine = {f"fdoc{p.pid}-c", f"fdoc{p.pid}-g"}  # ip netns exec execs ftpalg: the same pid
    deadline = time.monotonic() + 20
    while not mine <= namespaces() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mine <= namespaces()
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 130
    assert namespaces() == before  # its own, and the one left by a dead doctor, are gone
