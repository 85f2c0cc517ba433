"""SIGINT/SIGTERM as a recorded request to stop (ftpalg/linux/stop.py), in this process."""

from __future__ import annotations

import signal
import subprocess

from ftpalg import cli
from ftpalg.linux import stop


def test_a_stop_is_recorded_with_the_step_it_came_in_and_wakes_a_select():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop.stopping() as s:
        s.phase = "installing the rules"
        signal.raise_signal(signal.SIGTERM)  # no exception: recorded
        s.phase = "binding the queue"
        with stop.stopping() as inner:  # a later step sees the same stop
            assert inner is s
        signal.raise_signal(signal.SIGINT)
        assert s.signals == ["SIGTERM", "SIGINT"] and s.during == "installing the rules" and s.in_startup
        assert s.wake.recv(16)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_stop_once_serving_is_not_one_during_start_up():
    with stop.stopping() as s:
        assert not s and not s.in_startup
        s.phase = stop.SERVING
        signal.raise_signal(signal.SIGTERM)
        assert s and not s.in_startup


def test_a_child_started_while_held_has_both_signals_blocked():
    with stop.signals_held():
        out = subprocess.run(["grep", "^SigBlk", "/proc/self/status"], capture_output=True, text=True).stdout
    blocked = int(out.split()[1], 16)
    assert blocked >> (signal.SIGINT - 1) & 1 and blocked >> (signal.SIGTERM - 1) & 1
    out = subprocess.run(["grep", "^SigBlk", "/proc/self/status"], capture_output=True, text=True).stdout
    assert int(out.split()[1], 16) >> (signal.SIGTERM - 1) & 1 == 0  # and this thread's block is gone


def test_other_commands_get_the_usual_handlers_back(monkeypatch, capsys):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    seen = []
    real = cli.cmd_check_config

    def check_config(args):
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return real(args)

    monkeypatch.setattr(cli, "cmd_check_config", check_config)
    assert cli.main(["check-config"]) == 0
    assert seen == [before]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_ready_goes_to_the_service_managers_socket_if_there_is_one(monkeypatch, tmp_path, caplog):
    """sd_notify's READY=1 (the unit's Type=notify): a datagram to $NOTIFY_SOCKET, a path or an
    abstract name (@...); nothing without it; a socket that is gone is a warning, not a crash."""
    import socket

    from ftpalg.linux import notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    for name, addr in ((str(tmp_path / "notify"), str(tmp_path / "notify")), (f"@ftpalg-test-{id(tmp_path)}",
                                                                               f"\0ftpalg-test-{id(tmp_path)}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
            manager.bind(addr)
            monkeypatch.setenv("NOTIFY_SOCKET", name)
            notify.ready()
            assert manager.recv(64) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify.notify("READY=1") is False
    assert "could not tell systemd READY=1" in caplog.text
