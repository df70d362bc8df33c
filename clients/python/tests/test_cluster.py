"""The cluster client against three real members on loopback: it follows
the leader, resends keyed writes after the leader is killed, reports a
keyless write whose answer was lost as ``unknown_outcome``, and sends a
write that never left again on a new connection."""

import itertools
import os
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import ADMIN_PASSWORD, _binary
from tally import Client, ClusterClient, TallyError

SECRET = "the python tests' cluster secret, 32+ bytes"


_next_port = itertools.count((os.getpid() % 1000) * 11)


def _port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768 and
    up): one from that range, once let go, can be taken by any outgoing
    connection before the member binds it."""
    while True:
        port = 20000 + next(_next_port) % 12000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@pytest.fixture
def cluster(tmp_path):
    ports = {i: (_port(), _port()) for i in (1, 2, 3)}
    nodes = "".join(
        f'[[cluster.node]]\nid = {i}\nclient = "127.0.0.1:{c}"\nraft = "127.0.0.1:{r}"\n' for i, (c, r) in ports.items()
    )
    procs = {}
    env = dict(os.environ, TALLY_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, TALLY_LOG="warn")
    for i, (c, r) in ports.items():
        config = tmp_path / f"member-{i}.toml"
        config.write_text(
            f'listen = "127.0.0.1:{c}"\n[cluster]\nid = {i}\nraft_listen = "127.0.0.1:{r}"\nsecret = "{SECRET}"\n{nodes}'
        )
        p = subprocess.Popen(
            [_binary(), "serve", "--config", str(config), "--data", str(tmp_path / f"data-{i}")],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert p.stdout.readline().strip() == f"tally listening on 127.0.0.1:{c}"
        procs[i] = p
    yield {i: f"127.0.0.1:{c}" for i, (c, _) in ports.items()}, procs
    for p in procs.values():
        p.kill()
        p.wait()
        p.stdout.close()


def _stop(proc, within=10.0):
    """Sends SIGSTOP and returns once every thread of the process has
    stopped: the signal is queued for one thread, and the others run on
    until that one stops them (up to ~40 ms on a loaded machine), long
    enough for a "stopped" member to answer a request sent meanwhile."""
    proc.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + within
    while not _all_threads_stopped(proc.pid):
        assert time.monotonic() < deadline, f"process {proc.pid} did not stop within {within} s"
        time.sleep(0.001)


def _all_threads_stopped(pid):
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile is not running either
        # The state follows the command name, which is in parentheses.
        if not stat[stat.rindex(")") + 2 :].startswith("T"):
            return False
    return True


def _leader(addrs, within=30.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for i, a in addrs.items():
            host, port = a.rsplit(":", 1)
            try:
                with Client(host, int(port), timeout=1.0) as c:
                    if c.hello().get("role") == "leader":
                        return i
            except Exception:
                pass
        time.sleep(0.05)
    raise AssertionError("no leader")


def test_the_cluster_client_follows_the_leader_and_resends_only_keyed_writes(cluster):
    addrs, procs = cluster
    leader = _leader(addrs)
    host, port = addrs[leader].rsplit(":", 1)
    with Client(host, int(port)) as c:
        token = c.login("admin", ADMIN_PASSWORD)["token"]
    # A follower names the leader.
    follower = next(i for i in addrs if i != leader)
    host, port = addrs[follower].rsplit(":", 1)
    with Client(host, int(port)) as c:
        c.auth(token=token)
        with pytest.raises(TallyError) as e:
            c.balance("@mint")
        assert (e.value.code, e.value.leader) == ("not_leader", addrs[leader])

    # Given a follower first, the client still finds the leader.
    with ClusterClient([addrs[follower]] + list(addrs.values()), token=token, patience=30.0) as cc:
        cc.create_account("a", initial=100)
        cc.create_account("b")
        for i in range(20):
            if i == 10:
                procs[leader].kill()
                procs[leader].wait()
            cc.transfer("b", 1, from_="a", key=f"py-{i}")
        assert cc.balance("b")["balance"] == 20
        new = _leader({i: a for i, a in addrs.items() if i != leader})
        assert new != leader

        # A keyless write whose answer is lost is reported, not resent.
        procs[new].kill()
        procs[new].wait()
        with pytest.raises(TallyError) as e:
            cc.transfer("b", 1, from_="a")
        assert e.value.code == "unknown_outcome"


def test_a_keyed_write_whose_answer_timed_out_is_an_unknown_outcome(cluster):
    """No member answers (all stopped) after the client bound itself to the
    leader: the keyed write may have been applied, so the client says
    ``unknown_outcome``, never ``unavailable`` (which says nothing changed)."""
    addrs, procs = cluster
    leader = _leader(addrs)
    host, port = addrs[leader].rsplit(":", 1)
    with Client(host, int(port)) as c:
        token = c.login("admin", ADMIN_PASSWORD)["token"]
    with ClusterClient(list(addrs.values()), token=token) as cc:
        cc.create_account("a", initial=100)
        cc.create_account("b")
        cc.patience = 0.5
        for p in procs.values():
            _stop(p)
        try:
            with pytest.raises(TallyError) as e:
                cc.call_within(2.0, "transfer", to="b", amount=1, key="timed-out", **{"from": "a"})
        finally:
            for p in procs.values():
                p.send_signal(signal.SIGCONT)
        assert e.value.code == "unknown_outcome", e.value


class _ResettingProxy:
    """A proxy in front of one member's client port that can end every
    connection it carries with a reset (:meth:`cut`). After a member's FIN
    a client's next request still leaves; after a reset it cannot. On
    loopback the reset reaches the client's socket before the proxy's
    ``close`` returns, so once :meth:`cut` returns, the client's next write
    on that connection fails. One thread moves the bytes, so no other
    thread is inside a call on a socket when it is reset (a socket closed
    under a blocked ``recv`` is released, and reset, only once that returns)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self._listener.getsockname()[1]
        self.accepted = 0
        self._wake, self._woken = socket.socketpair()
        self._reset = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def cut(self, within: float = 30.0) -> None:
        """Resets every connection it carries; returns once they are reset."""
        self._reset.clear()
        self._wake.send(b"x")
        assert self._reset.wait(within), "the proxy did not reset its connections"

    def close(self) -> None:
        """Stops the proxy and closes every socket it holds."""
        self._wake.close()
        self._thread.join(10.0)
        assert not self._thread.is_alive(), "the proxy did not stop"

    def _run(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._other = {}  # each end of a carried connection -> its other end
        self._inbound = []
        try:
            self._sel.register(self._listener, selectors.EVENT_READ)
            self._sel.register(self._woken, selectors.EVENT_READ)
            self._move()
        finally:
            for end in list(self._other):
                self._drop(end)
            self._sel.close()
            self._listener.close()
            self._woken.close()

    def _drop(self, s) -> None:
        """Closes both ends of the connection `s` is an end of."""
        for end in (s, self._other.get(s)):
            if end in self._other:
                self._sel.unregister(end)
                del self._other[end]
                end.close()

    def _move(self) -> None:
        other = self._other
        while True:
            for key, _ in self._sel.select():
                s = key.fileobj
                if s is self._listener:
                    a, _ = s.accept()
                    b = socket.create_connection(self._target)
                    self.accepted += 1
                    other[a], other[b] = b, a
                    self._inbound.append(a)
                    self._sel.register(a, selectors.EVENT_READ)
                    self._sel.register(b, selectors.EVENT_READ)
                elif s is self._woken:
                    if not s.recv(1):
                        return
                    for a in self._inbound:
                        if a in other:
                            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            self._drop(a)
                    self._inbound.clear()
                    self._reset.set()
                elif s in other:  # not dropped earlier in this round
                    try:
                        data = s.recv(65536)
                        if data:
                            other[s].sendall(data)
                            continue
                    except OSError:
                        pass
                    self._drop(s)


def test_a_write_never_sent_on_an_ended_connection_goes_again_on_a_new_one(cluster):
    """A write on a connection that ended before it was sent never left, so
    it goes again on a new connection, a keyless one too, and is applied once."""
    addrs, _ = cluster
    leader = _leader(addrs)
    host, port = addrs[leader].rsplit(":", 1)
    with Client(host, int(port)) as c:
        token = c.login("admin", ADMIN_PASSWORD)["token"]
        c.create_account("a", initial=100)
        c.create_account("b")
    proxy = _ResettingProxy(addrs[leader])
    try:
        with ClusterClient([proxy.addr], token=token, patience=30.0) as cc:
            assert cc.balance("b")["balance"] == 0
            proxy.cut()
            before = proxy.accepted
            r = cc.transfer("b", 7, from_="a")
            assert (r["from_balance"], r["to_balance"]) == (93, 7)
            assert proxy.accepted > before, "sent on a new connection"
    finally:
        proxy.close()
    with Client(host, int(port)) as c:
        c.auth(token=token)
        assert c.balance("b")["balance"] == 7
