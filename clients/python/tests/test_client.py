"""Proves the Python client against the real server: results, error codes,
pipelining and the asyncio client."""

import asyncio

import pytest

from tally import (
    AUDIT_TIMEOUT_S,
    LONG_TIMEOUT_S,
    TIMEOUT_S,
    AsyncClient,
    Client,
    TallyConnectionError,
    TallyError,
    TallyNotSentError,
    timeout_for,
)

from conftest import ADMIN_PASSWORD


def admin(server) -> Client:
    c = Client(*server)
    c.login("admin", ADMIN_PASSWORD)
    return c


def test_transfer_moves_exact_amounts(server):
    with Client(*server) as anon:
        assert anon.hello() == {"server": "tally", "protocol": 1}
        assert anon.health() == {"status": "ok"}
    with admin(server) as c:
        assert c.ping() == "pong"
        assert c.hello()["protocol"] == 1
        assert "version" in c.hello()
        c.create_account("alice", initial=100)
        c.create_account("bob")
        t = c.transfer("bob", 30, from_="alice", memo="lunch")
        assert (t["from"], t["to"], t["amount"], t["fee"]) == ("alice", "bob", 30, 0)
        assert (t["from_balance"], t["to_balance"]) == (70, 30)
        assert c.balance("alice")["balance"] == 70
        assert c.balance("bob") == {"account": "bob", "balance": 30, "held": 0, "available": 30}
        assert c.get_transfer(t["id"])["memo"] == "lunch"
        audit = c.audit()
        assert audit["sum"] == 0 and audit["chain_ok"] is True


def test_error_codes(server):
    with admin(server) as c:
        c.create_account("alice", initial=5)
        c.create_account("bob")
        cases = [
            (lambda: c.transfer("bob", 6, from_="alice"), "insufficient_funds"),
            (lambda: c.transfer("nobody", 1, from_="alice"), "not_found"),
            (lambda: c.transfer("bob", 0, from_="alice"), "bad_request"),
            (lambda: c.transfer("bob", 2**64 - 1, from_="alice"), "bad_request"),
            (lambda: c.transfer("bob", 1.5, from_="alice"), "bad_request"),
            (lambda: c.call("no_such_op"), "unknown_op"),
            (lambda: c.create_account("alice"), "exists"),
        ]
        for fn, code in cases:
            with pytest.raises(TallyError) as e:
                fn()
            assert e.value.code == code
        assert c.balance("alice")["balance"] == 5
    with Client(*server) as anon:
        with pytest.raises(TallyError) as e:
            anon.balance("alice")
        assert e.value.code == "unauthenticated"
        with pytest.raises(TallyError) as e:
            anon.login("admin", "wrong")
        assert e.value.code == "unauthenticated"


def test_pipeline_collects_replies_by_id(server):
    with admin(server) as c:
        c.create_account("alice", initial=50)
        c.create_account("bob")
        with c.pipeline() as p:
            for _ in range(60):
                p.transfer("bob", 1, from_="alice")
            p.balance("nobody")
        results = p.results
        assert len(results) == 61
        ok = [r for r in results[:60] if not isinstance(r, TallyError)]
        refused = [r for r in results[:60] if isinstance(r, TallyError)]
        assert len(ok) == 50
        assert {r.code for r in refused} == {"insufficient_funds"}
        assert isinstance(results[60], TallyError) and results[60].code == "not_found"
        assert c.balance("bob")["balance"] == 50


def test_async_client_pipelines(server):
    async def main():
        async with AsyncClient(*server) as c:
            await c.login("admin", ADMIN_PASSWORD)
            await c.create_account("alice", initial=1000)
            await c.create_account("bob")
            results = await asyncio.gather(*(c.transfer("bob", 2, from_="alice") for _ in range(200)))
            assert len({r["id"] for r in results}) == 200
            assert (await c.balance("bob"))["balance"] == 400
            with pytest.raises(TallyError) as e:
                await c.transfer("bob", 10_000, from_="alice")
            assert e.value.code == "insufficient_funds"

    asyncio.run(main())


def test_a_call_waits_as_long_as_it_is_told(server):
    # A login hashes its password (argon2id, tens of ms): longer than 1 ms.
    with Client(*server) as c:
        with pytest.raises(TallyConnectionError):
            c.call_within(0.001, "login", user="admin", password=ADMIN_PASSWORD)
        # The client's own timeout is back, and the late answer is skipped:
        # a login's answer is not hello's.
        assert c.hello()["server"] == "tally"
        c.login("admin", ADMIN_PASSWORD)
        assert c.whoami()["user"] == "admin"
        audit = c.audit()
        assert audit["sum"] == 0 and audit["chain_ok"] is True
        with c.pipeline() as p:
            p.audit()
            p.ping()
        assert p.results[0]["sum"] == 0 and p.results[1] == "pong"
        for bad in (0, -1):
            with pytest.raises(ValueError):
                c.call_within(bad, "ping")
    with Client(*server) as c:
        c.close()
        # Never sent, so nothing was applied: a subclass of the connection error.
        with pytest.raises(TallyNotSentError):
            c.call_within(5, "ping")
        with pytest.raises(TallyNotSentError):
            c.ping()

    async def main():
        async with AsyncClient(*server) as c:
            with pytest.raises(asyncio.TimeoutError):
                await c.call_within(0.001, "login", user="admin", password=ADMIN_PASSWORD)
            assert c._pending == {}, "a call that timed out leaves nothing waiting"
            await c.login("admin", ADMIN_PASSWORD)
            assert (await c.whoami())["user"] == "admin"
            assert (await c.audit())["sum"] == 0
        with pytest.raises(TallyNotSentError):
            await c.ping()  # closed: nothing sent
        with pytest.raises(TallyNotSentError):
            await AsyncClient(*server).ping()  # never connected: nothing sent

    asyncio.run(main())


def test_idempotent_key(server):
    with admin(server) as c:
        c.create_account("alice", initial=10)
        c.create_account("bob")
        first = c.transfer("bob", 4, from_="alice", key="k-1")
        again = c.transfer("bob", 4, from_="alice", key="k-1")
        assert first["id"] == again["id"]
        with pytest.raises(TallyError) as e:
            c.transfer("bob", 5, from_="alice", key="k-1")
        assert e.value.code == "key_conflict"
        assert c.balance("bob")["balance"] == 4


def test_transfer_batch_each_on_its_own_or_all_or_none(server):
    with admin(server) as c:
        c.create_account("pa", initial=50)
        c.create_account("pb")
        r = c.transfer_batch(
            [{"from": "pa", "to": "pb", "amount": 20}, {"from": "pa", "to": "pb", "amount": 40}]
        )
        assert (r["applied"], r["failed"]) == (1, 1)
        assert (r["results"][0]["from_balance"], r["results"][0]["to_balance"]) == (30, 20)
        assert r["results"][1]["code"] == "insufficient_funds"
        with pytest.raises(TallyError) as e:
            c.transfer_batch(
                [{"from": "pa", "to": "pb", "amount": 10}, {"from": "pb", "to": "pa", "amount": 99}],
                atomic=True,
            )
        assert (e.value.code, e.value.item) == ("insufficient_funds", 1)
        assert (c.balance("pa")["balance"], c.balance("pb")["balance"]) == (30, 20)


def test_calls_wait_by_their_op_unless_told():
    # Beyond the server's own waits (a code's mail, ~33 s); the whole
    # ledger's ops longer; a membership change past the server's 60 s.
    assert timeout_for("transfer") == timeout_for("list_accounts") == TIMEOUT_S == 60.0
    for op in ("audit", "backup", "bulk_add", "reap"):
        assert timeout_for(op) == LONG_TIMEOUT_S == AUDIT_TIMEOUT_S == 3600.0
    assert timeout_for("add_node") == timeout_for("remove_node") == 120.0


def test_connection_errors_are_distinct():
    with pytest.raises(TallyConnectionError):
        Client("127.0.0.1", 1, timeout=2)
