"""The wheel, installed as docs/deploying.md says, and ``ftpalg install``.

The wheel is built from a copy of the source tree (``pip wheel --no-deps --no-build-isolation``
with this venv's setuptools: no network, nothing written into the checkout) and installed
into fresh venvs made from the system python (``/usr/bin/python3 -m venv``) in a directory
others may read, as on a gateway: one with ``--no-deps`` only (``--version``,
``check-config`` and ``install`` must work before netfilterqueue is importable), one with its
dependencies from PyPI (the service test; skipped if pip cannot reach PyPI, but failed in
CI, see tests/needs.py).

The service is not started by systemd itself here: on this machine systemd is installed but
is not PID 1 (no /run/systemd/system), so ``systemctl start`` has no manager to ask. What is
tested instead: ``systemd-analyze verify`` of the unit ``ftpalg install`` wrote, and, in a lab
gateway namespace, the unit's ``ExecStart=`` run the way systemd runs it (a dynamic uid with
no passwd entry, no groups, only CAP_NET_ADMIN in every set and ambient, no_new_privs, an
empty environment, cwd /), with the installed configuration: it binds its queue, serves a
pinhole, answers ``ftpalg status`` and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from needs import need
from wheels import OFFLINE, ROOT

import ftpalg
from ftpalg import install
from ftpalg.lab.systemd import CLEAN_ENV

DEPLOY = ROOT / "deploy"
SYSTEM_PYTHON = Path("/usr/bin/python3")
DYNAMIC_UID = 61184  # the first uid systemd's DynamicUser= hands out; no passwd entry here
CAP_NET_ADMIN = 12


def run(argv: list[str | Path], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A command with the environment systemd gives a service (no PYTHONPATH, no venv), cwd /."""
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd="/", env=CLEAN_ENV,
                         timeout=timeout)
    if check:
        assert res.returncode == 0, f"{argv}: {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def make_venv(whl: Path, deps: bool) -> Iterator[Path]:
    """A venv from the system python, under a directory others may read, with the wheel
    (and its dependencies if ``deps``) installed by pip, as docs/deploying.md says."""
    need(SYSTEM_PYTHON.exists(), str(SYSTEM_PYTHON))
    need(run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info >= (3, 11))"]).stdout.strip() == "True",
         f"{SYSTEM_PYTHON} 3.11 or newer")
    base = Path(tempfile.mkdtemp(prefix="ftpalg-pkg-"))
    try:
        base.chmod(0o755)
        venv = base / "venv"
        run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv])  # this venv's pip installs into it
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
               "--disable-pip-version-check"]
        res = subprocess.run([*pip, *([] if deps else ["--no-deps"]), str(whl)], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0 and deps and OFFLINE.search(res.stderr):
            need(False, f"PyPI for the wheel's dependencies (pip could not reach it):\n{res.stderr[-2000:]}")
        assert res.returncode == 0, res.stdout + res.stderr  # any other failure of pip's is a failure
        yield venv
    finally:
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def bare(wheel) -> Iterator[Path]:
    """The wheel alone (``pip install --no-deps``): no netfilterqueue, no prometheus-client."""
    yield from make_venv(wheel, deps=False)


@pytest.fixture(scope="module")
def full(wheel) -> Iterator[Path]:
    yield from make_venv(wheel, deps=True)


@pytest.fixture
def stage() -> Iterator[Path]:
    """A staging root others may read (the service test's uid reads its configuration)."""
    d = Path(tempfile.mkdtemp(prefix="ftpalg-stage-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d)


def staged(stage: Path, path: Path) -> Path:
    return stage / path.relative_to("/")


def expected_unit(exe: Path) -> str:
    text = (DEPLOY / "ftpalg.service").read_text()
    (old,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    return (f"# Written by `ftpalg install` (ftpalg {ftpalg.__version__}): ExecStart= is that installation's "
            f"ftpalg.\n" + text.replace(old, f"ExecStart={exe} run"))


def exec_start(unit: Path) -> list[str]:
    (line,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


# ---- the wheel -------------------------------------------------------------------------------
def test_wheel_carries_the_deploy_files_and_only_the_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        data = f"ftpalg-{ftpalg.__version__}.data/data/share/ftpalg/"
        for name in install.DEPLOY_FILES:
            assert z.read(data + name) == (DEPLOY / name).read_bytes(), name
        assert sorted(n.removeprefix(data) for n in names if n.startswith(data)) == sorted(install.DEPLOY_FILES)
        for page in install.MAN_PAGES:  # package data
            assert z.read(f"ftpalg/man/{page}") == (install.MAN_SOURCE / page).read_bytes(), page
        assert "ftpalg/install.py" in names and "ftpalg/cli.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops == {"ftpalg", f"ftpalg-{ftpalg.__version__}.data", f"ftpalg-{ftpalg.__version__}.dist-info"}, tops


def test_version_and_check_config_need_no_runtime_dependencies(bare):
    ftpalg_bin = bare / "bin" / "ftpalg"
    assert run([ftpalg_bin, "--version"]).stdout.strip() == ftpalg.__version__
    for name in install.RUNTIME_PACKAGES:  # pip install --no-deps: really absent
        assert run([bare / "bin" / "python", "-c", f"import {name}"], check=False).returncode == 1
    out = run([ftpalg_bin, "check-config", DEPLOY / "ftpalg.toml"]).stdout
    assert "control_ports = [21]" in out
    # the wheel's code runs, not this checkout's
    where = run([bare / "bin" / "python", "-c", "import ftpalg; print(ftpalg.__file__)"]).stdout.strip()
    assert where.startswith(str(bare)), where


# ---- ftpalg install --------------------------------------------------------------------------
def test_install_writes_unit_config_and_rules_from_the_wheel(bare, stage):
    ftpalg_bin = bare / "bin" / "ftpalg"
    res = run([ftpalg_bin, "install", "--root", stage])
    unit = staged(stage, install.UNIT)
    assert unit.read_text() == expected_unit(ftpalg_bin)
    assert exec_start(unit) == [str(ftpalg_bin), "run"]
    assert staged(stage, install.CONFIG).read_text() == (DEPLOY / "ftpalg.toml").read_text()
    for name in install.RULE_FILES:
        assert staged(stage, install.RULES_DIR / name).read_text() == (DEPLOY / name).read_text(), name
    for page in install.MAN_PAGES:
        assert staged(stage, install.man_path(page)).read_bytes() == (ROOT / "ftpalg" / "man" / page).read_bytes()
    for path in stage.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
    out = res.stdout
    assert f"wrote         {unit}" in out and "share/ftpalg" in out  # deploy files from the wheel's data
    assert "systemctl daemon-reload && systemctl enable --now ftpalg" in out and "journalctl -u ftpalg" in out
    # the venv is under /tmp, which the unit's PrivateTmp= hides; every file is readable by others
    assert "PrivateTmp=yes" in out and "others may not" not in out, out
    assert "netfilterqueue, prometheus_client cannot be imported" in out  # --no-deps
    # the installed configuration is what `ftpalg run` under the unit would read
    assert "control_ports = [21]" in run([ftpalg_bin, "check-config", staged(stage, install.CONFIG)]).stdout

    # again: an edited configuration and an edited rule file stay; --force replaces the rule file only
    config = staged(stage, install.CONFIG)
    edited = config.read_text().replace("control_ports = [21]", "control_ports = [21, 2121]")
    config.write_text(edited)
    rule = staged(stage, install.RULES_DIR / "queue.iptables")
    rule.write_text("# mine\n")
    out = run([ftpalg_bin, "install", "--root", stage]).stdout
    assert f"kept          {config}  (exists: a configuration is never overwritten" in out
    assert f"kept          {rule}  (exists and differs: --force replaces it)" in out
    assert f"unchanged     {unit}" in out
    assert config.read_text() == edited and rule.read_text() == "# mine\n"
    out = run([ftpalg_bin, "install", "--root", stage, "--force"]).stdout
    assert config.read_text() == edited and rule.read_text() == (DEPLOY / "queue.iptables").read_text()
    assert f"replaced      {rule}" in out


def test_man_finds_the_installed_pages(bare, stage):
    """`man ftpalg` and `man ftpalg.toml` find the pages where `ftpalg install` put them (here
    under a staging root: -M is that root's /usr/local/share/man), with nothing else to do
    (no mandb run)."""
    man = shutil.which("man")
    need(man, "man (Debian package man-db)")
    run([bare / "bin" / "ftpalg", "install", "--root", stage])
    manpath = staged(stage, install.MAN_DIR)
    env = {**CLEAN_ENV, "MANWIDTH": "100"}
    res = subprocess.run([man, "-M", manpath, "-P", "cat", "ftpalg"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("FTPALG(8)") and "ftpalg run" in out and "--control-port PORT" in out, out[:500]
    res = subprocess.run([man, "-M", manpath, "-P", "cat", "5", "ftpalg.toml"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("FTPALG.TOML(5)") and "control_ports = [21]" in res.stdout, res.stdout[:500]
    # the default configuration the pages describe is the one installed
    assert "pinhole_timeout = 120.0" in res.stdout
    assert "pinhole_timeout = 120.0" in staged(stage, install.CONFIG).read_text()


def test_install_leaves_a_masked_unit_alone(bare, stage):
    unit = staged(stage, install.UNIT)
    unit.parent.mkdir(parents=True)
    unit.symlink_to("/dev/null")  # systemctl mask ftpalg
    out = run([bare / "bin" / "ftpalg", "install", "--root", stage, "--force"]).stdout
    assert f"kept          {unit}  (not a regular file" in out
    assert unit.is_symlink() and os.readlink(unit) == "/dev/null"


def test_install_dry_run_writes_nothing(bare, stage):
    out = run([bare / "bin" / "ftpalg", "install", "--root", stage, "--dry-run"]).stdout
    assert f"would write   {staged(stage, install.UNIT)}" in out
    assert list(stage.iterdir()) == []


def test_install_refuses_where_it_cannot_write(bare, stage):
    (stage / "etc").mkdir()
    (stage / "etc" / "systemd").write_text("not a directory")
    res = run([bare / "bin" / "ftpalg", "install", "--root", stage], check=False)
    assert res.returncode == 1, res
    assert f"cannot write {staged(stage, install.UNIT)} ({stage}/etc/systemd is not a directory); nothing was " \
           "written" in res.stderr, res.stderr
    assert sorted(p.name for p in stage.rglob("*")) == ["etc", "systemd"]


def test_unit_verifies(bare, stage):
    analyze = shutil.which("systemd-analyze")
    need(analyze, "systemd-analyze (Debian package systemd)")
    run([bare / "bin" / "ftpalg", "install", "--root", stage])
    unit = staged(stage, install.UNIT)  # its ExecStart= is the real venv's ftpalg, not under the stage
    res = run([analyze, "verify", unit], check=False)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    broken = stage / "broken" / "ftpalg.service"  # verify does check ExecStart=
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace(f"ExecStart={bare}", "ExecStart=/nonexistent"))
    res = run([analyze, "verify", broken], check=False)
    assert res.returncode != 0 and "/nonexistent/bin/ftpalg" in res.stderr, res.stderr


def test_unreadable_installations_are_named(stage, monkeypatch):
    assert "under /root, which the unit hides from the service (ProtectHome=yes)" in (
        install.service_cannot_read(Path("/root/venv/bin/python3"), execute=True) or "")
    assert "PrivateTmp=yes" in (install.service_cannot_read(Path(tempfile.gettempdir()) / "venv") or "")
    monkeypatch.setattr(install, "HIDDEN", {})  # the stage is under /tmp: look at permissions alone
    private, script = stage / "private", stage / "private" / "bin" / "ftpalg"
    script.parent.mkdir(parents=True)
    script.write_text("#!/usr/bin/python3\n")
    script.chmod(0o755)
    private.chmod(0o700)
    assert install.service_cannot_read(script, execute=True) == f"{private} is drwx------: others may not enter it"
    private.chmod(0o755)
    assert install.service_cannot_read(script, execute=True) is None
    script.chmod(0o600)
    assert install.service_cannot_read(script, execute=True) == f"{script} is -rw-------: others may not run it"


def test_unit_exec_start_is_quoted_for_systemd():
    assert install.unit_text("A\nExecStart=x\nB\n", ["/opt/f tp/bin/ftpalg"]).endswith(
        'A\nExecStart="/opt/f tp/bin/ftpalg" run\nB\n')
    assert "ExecStart=/opt/100%%/bin/ftpalg run" in install.unit_text("ExecStart=x\n", ["/opt/100%/bin/ftpalg"])


# ---- the service, as systemd would run it --------------------------------------------------
def as_dynamic_user() -> list[str]:
    """What the unit's DynamicUser=, CapabilityBoundingSet=, AmbientCapabilities= and
    NoNewPrivileges= give ExecStart, then ``env -i`` (execs as that uid: its path is checked
    with that uid's rights) with systemd's clean environment and cwd /."""
    caps = "-all,+net_admin"
    return ["setpriv", f"--reuid={DYNAMIC_UID}", f"--regid={DYNAMIC_UID}", "--clear-groups",
            f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}", "--no-new-privs", "--",
            "env", "-i", "-C", "/", *(f"{k}={v}" for k, v in CLEAN_ENV.items())]


@pytest.mark.netns
def test_installed_unit_exec_start_serves_as_a_dynamic_user(full, stage, lab):
    from test_netns_privileges import active_transfer_with_pinhole, rules

    need(shutil.which("setpriv"), "setpriv (util-linux)")
    ftpalg_bin = full / "bin" / "ftpalg"
    out = run([ftpalg_bin, "install", "--root", stage]).stdout
    assert "cannot be imported" not in out and "others may not" not in out, out
    argv = exec_start(staged(stage, install.UNIT))
    assert argv == [str(ftpalg_bin), "run"]
    config = staged(stage, install.CONFIG)  # what the unit reads from /etc/ftpalg/ftpalg.toml
    before = rules(lab)
    log = lab.ftpalg_log_path()
    log.write_bytes(b"")
    p = lab.popen(lab.gw, [*as_dynamic_user(), *argv, "--config", str(config)], log)
    try:
        deadline = time.monotonic() + 15
        while b"bound to NFQUEUE" not in log.read_bytes() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"bound to NFQUEUE" in log.read_bytes(), log.read_text()
        status = {k: v.strip() for k, _, v in (line.partition(":") for line in
                                                Path(f"/proc/{p.pid}/status").read_text().splitlines())}
        assert status["Uid"].split() == [str(DYNAMIC_UID)] * 4 and status["Groups"] == ""
        for key in ("CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"):
            assert int(status[key], 16) == 1 << CAP_NET_ADMIN, (key, status[key])
        cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")
        assert os.fsencode(ftpalg_bin) in cmdline, cmdline  # the wheel's ftpalg (its venv's python runs it)
        assert f"configuration: {config}" in log.read_text()
        active_transfer_with_pinhole(lab)
        res = lab.ns(lab.gw, [str(ftpalg_bin), "status", "--json", "--config", str(config)])
        doc = json.loads(res.stdout)
        assert doc["pid"] == p.pid and doc["pinholes"] == [], doc
    finally:
        rc = lab.stop_ftpalg(p)  # SIGTERM, as systemctl stop (KillSignal=SIGTERM)
    text = log.read_text()
    assert rc == 0, text
    assert "rules removed" in text and "Traceback" not in text, text
    assert rules(lab) == before
