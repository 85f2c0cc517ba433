"""Control connections this host did not forward (a client on the gateway itself, docker-proxy
relaying one to a container): the kernel gave them no helper, so no pinhole can be opened for
them. The core lets them pass untouched, said once per connection (``not_forwarded``, a
warning the first time, info after), instead of failing at each announcement (the kernel's
EOPNOTSUPP), refusing a 227 it cannot relate, or calling a reply unsolicited."""

from __future__ import annotations

import logging

import pytest
from test_ctnetlink import KEY, REPLY, KernelSocket

from alg_helpers import Conn, Driven, FakeKernel
from ftpalg.core.events import Reason, Refused
from ftpalg.core.kernel import NotForwarded
from ftpalg.linux import ctnetlink as ct
from ftpalg.linux.kernel import LinuxKernel

PASV_REPLY = b"227 Entering Passive Mode (172,17,0,2,195,80).\r\n"


@pytest.fixture
def env():
    nat = FakeKernel()
    return Driven(nat, pinhole_timeout=120.0), nat


def not_forwarded(alg: Driven) -> list[Refused]:
    return [e for e in alg.seen if isinstance(e, Refused) and e.reason is Reason.NOT_FORWARDED]


def local(alg: Driven, nat: FakeKernel, handshake: bool = True, port: int = 40000,
          client: str = "127.0.0.1", server: str = "127.0.0.1") -> Conn:
    """A control connection the kernel gave no helper (this host opened it)."""
    conn = Conn(alg, nat, client=(client, port), server=(server, 21), public=(client, port), handshake=False)
    nat.unforwarded.add(conn.key)
    if handshake:
        conn.c(b"", "S")
        conn.s(b"", "SA")
        conn.c(b"", "A")
    return conn


def session(conn: Conn) -> None:
    conn.s(b"220 hello\r\n")
    conn.c(b"USER anonymous\r\n")
    conn.s(b"331 ok\r\n")
    conn.c(b"PASS x\r\n")
    conn.s(b"230 ok\r\n")
    for _ in range(3):
        assert conn.c(b"PASV\r\n").payload == b"PASV\r\n"
        assert conn.s(PASV_REPLY).payload == PASV_REPLY  # not rewritten
        assert conn.c(b"EPRT |1|127.0.0.1|50000|\r\n").payload == b"EPRT |1|127.0.0.1|50000|\r\n"


def test_a_connection_without_helper_passes_untouched_said_once(env, caplog):
    alg, nat = env
    conn = local(alg, nat)
    with caplog.at_level(logging.INFO, "ftpalg"):
        session(conn)
    assert [e.flow for e in not_forwarded(alg)] == [conn.key]
    assert not nat.opened and alg.counters["not_forwarded"] == 1
    assert not alg.flows and len(alg.passing) == 2  # forgotten; both tuples pass
    assert {r.levelname for r in caplog.records} == {"WARNING"} and "not_forwarded" in caplog.text
    for reason in ("pinhole_failed", "refused", "unsolicited", "no_nat_mapping"):
        assert alg.counters[reason] == 0, reason
    conn.c(b"", "FA")
    assert not alg.passing  # its end: the tuples may be a forwarded connection's later


def test_a_reply_of_a_connection_without_helper_met_first_from_the_server(env, caplog):
    """docker-proxy's connection to the container: only the server's side passes prerouting."""
    alg, nat = env
    conn = local(alg, nat, False, client="172.17.0.1", server="172.17.0.2")
    with caplog.at_level(logging.INFO, "ftpalg"):
        for _ in range(3):
            assert conn.s(PASV_REPLY).payload == PASV_REPLY
    assert [e.flow for e in not_forwarded(alg)] == [conn.key]
    assert alg.counters["nat_lookups"] == 1 and alg.counters["unsolicited"] == 0 and not nat.opened
    # a second such connection: counted, said at info level only
    other = local(alg, nat, False, 40002, client="172.17.0.1", server="172.17.0.2")
    with caplog.at_level(logging.INFO, "ftpalg"):
        other.s(PASV_REPLY)
    assert alg.counters["not_forwarded"] == 2
    assert [r.levelname for r in caplog.records if "not_forwarded" in r.getMessage()] == ["WARNING", "INFO"]


def test_forwarded_connections_are_served_beside_them(env):
    alg, nat = env
    session(local(alg, nat))
    conn = Conn(alg, nat)
    conn.s(b"220 hello\r\n")
    assert conn.c(b"PORT 10,0,0,2,195,80\r\n").payload == b"PORT 203,0,113,1,195,80\r\n"
    assert len(nat.opened) == 1 and alg.counters["not_forwarded"] == 1


@pytest.mark.parametrize("helper, raises", [("sane", False), (None, True)])
def test_linux_kernel_tells_a_connection_without_helper(helper, raises):
    nl = ct.CtNetlink()
    nl._sock.close()
    nl._sock = KernelSocket(helper=helper)  # type: ignore[assignment]
    kernel = LinuxKernel(nl, 120.0)
    if not raises:
        assert kernel.mapping(KEY) == (REPLY, False)
        return
    with pytest.raises(NotForwarded) as e:
        kernel.mapping(KEY)
    assert e.value.other == REPLY
