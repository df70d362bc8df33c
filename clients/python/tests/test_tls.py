"""The Python client over TLS, against the real server's TLS port."""

import socket
import ssl

import pytest
import trustme

from conftest import ADMIN_PASSWORD
from tally import AsyncClient, Client, TallyError


def test_tls_with_a_ca_file_works_and_checks_the_host_name(tls_server):
    _, (host, port), ca = tls_server
    with Client(host, port, tls=True, ca=ca) as c:
        assert c.ping() == "pong"
        c.login("admin", ADMIN_PASSWORD)
        c.create_account("alice", initial=100)
        t = c.transfer("@treasury", 5, from_="alice")
        assert (t["from_balance"], t["to_balance"]) == (95, 5)
        assert t["by"] == "admin"
    # The certificate names 127.0.0.1 and localhost, not this name: refused
    # even though the CA is trusted.
    ctx = ssl.create_default_context(cafile=ca)
    with socket.create_connection((host, port)) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="match"):
            ctx.wrap_socket(raw, server_hostname="tally.example.org")
    # And by name: localhost is in the certificate.
    with Client("localhost", port, tls=True, ca=ca) as c:
        assert c.hello()["server"] == "tally"


def test_a_client_trusting_another_ca_is_refused(tls_server, tmp_path):
    plain, (host, port), ca = tls_server
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        Client(host, port, tls=True, ca=str(other))
    # Without a CA file the system's roots do not know the test CA either.
    with pytest.raises(ssl.SSLCertVerificationError):
        Client(host, port, tls=True)
    # The server keeps serving, on both ports.
    with Client(host, port, tls=True, ca=ca) as c:
        assert c.ping() == "pong"
    with Client(*plain) as c:
        assert c.ping() == "pong"


def test_a_key_binds_over_tls_and_wrong_keys_are_refused(tls_server):
    _, (host, port), ca = tls_server
    with Client(host, port, tls=True, ca=ca) as admin:
        admin.login("admin", ADMIN_PASSWORD)
        made = admin.create_key("reports", "auditor")
    assert made["secret"].startswith("tally_" + made["key_id"] + "_")
    with Client(host, port, tls=True, ca=ca) as app:
        assert app.auth(key=made["secret"]) == {"user": "key:" + made["key_id"], "role": "auditor"}
        assert app.audit()["sum"] == 0
        with pytest.raises(TallyError) as e:
            app.mint("nobody", 1)
        assert e.value.code == "forbidden"
    with Client(host, port, tls=True, ca=ca) as app:
        with pytest.raises(TallyError) as e:
            app.auth(key=made["secret"][:-1] + ("A" if made["secret"][-1] != "A" else "B"))
        assert (e.value.code, e.value.message) == ("unauthenticated", "invalid key")


def test_the_asyncio_client_speaks_tls(tls_server):
    import asyncio

    _, (host, port), ca = tls_server

    async def run():
        async with AsyncClient(host, port, tls=True, ca=ca) as c:
            replies = await asyncio.gather(*(c.ping() for _ in range(50)))
            assert replies == ["pong"] * 50

    asyncio.run(run())


def test_a_ca_without_tls_is_a_mistake_not_plaintext(tls_server):
    plain, _, ca = tls_server
    with pytest.raises(ValueError, match="need tls=True"):
        Client(*plain, ca=ca)
    with pytest.raises(ValueError, match="need tls=True"):
        AsyncClient(*plain, cert=ca)


def test_http_is_https_with_the_tls_certificate(tmp_path):
    import http.client
    import json

    from conftest import _start, tls_files

    ca_file, cert_file, key_file = tls_files(tmp_path)
    proc, _, (host, port) = _start(
        tmp_path, TALLY_HTTP_LISTEN="127.0.0.1:0", TALLY_TLS_CERT=str(cert_file), TALLY_TLS_KEY=str(key_file)
    )
    try:
        conn = http.client.HTTPSConnection(host, port, context=ssl.create_default_context(cafile=str(ca_file)))
        login = json.dumps({"user": "admin", "password": ADMIN_PASSWORD})
        conn.request("POST", "/v1/login", body=login, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert (r.status, json.loads(r.read())["role"]) == (200, "admin")
        # Plain HTTP on the HTTPS port gets no answer in the clear.
        plain = http.client.HTTPConnection(host, port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain.request("GET", "/healthz")
            plain.getresponse()
    finally:
        proc.kill()
        proc.wait()
