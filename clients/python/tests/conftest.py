"""Starts the real tally binary on a free port with a temporary data folder."""

import os
import pathlib
import subprocess

import pytest

ADMIN_PASSWORD = "py-admin-password"
ROOT = pathlib.Path(__file__).resolve().parents[3]


def _binary() -> str:
    env = os.environ.get("TALLY_BIN")
    if env:
        return env
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "tally"
        if p.exists():
            return str(p)
    raise RuntimeError("build tally first (cargo build) or set TALLY_BIN")


def _address(line: str, prefix: str):
    line = line.strip()
    assert line.startswith(prefix), line
    host, port = line[len(prefix) :].rsplit(":", 1)
    return host, int(port)


def _start(tmp_path, **extra_env):
    env = dict(os.environ, TALLY_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, TALLY_LOG="warn", **extra_env)
    proc = subprocess.Popen(
        [_binary(), "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    # One line per listener, in this order: plaintext, TLS, HTTP.
    addrs = [_address(proc.stdout.readline(), "tally listening on ")]
    if extra_env.get("TALLY_TLS_LISTEN"):
        addrs.append(_address(proc.stdout.readline(), "tally listening with tls on "))
    if extra_env.get("TALLY_HTTP_LISTEN"):
        scheme = "https" if extra_env.get("TALLY_TLS_CERT") else "http"
        addrs.append(_address(proc.stdout.readline(), f"tally listening with {scheme} on "))
    return (proc, *addrs)


def tls_files(tmp_path):
    """A certificate for 127.0.0.1 and localhost from a throwaway CA:
    (CA file, certificate chain file, key file)."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert.private_key_pem.write_to_path(str(key_file))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(cert_file), append=i > 0)
    return ca_file, cert_file, key_file


@pytest.fixture()
def tls_server(tmp_path):
    """A server with a TLS port whose certificate names 127.0.0.1 and
    localhost, signed by a throwaway CA: yields (plain addr, TLS addr, CA file)."""
    ca_file, cert_file, key_file = tls_files(tmp_path)
    proc, plain, tls = _start(
        tmp_path,
        TALLY_TLS_LISTEN="127.0.0.1:0",
        TALLY_TLS_CERT=str(cert_file),
        TALLY_TLS_KEY=str(key_file),
    )
    yield plain, tls, str(ca_file)
    proc.kill()
    proc.wait()


@pytest.fixture()
def server(tmp_path):
    proc, addr = _start(tmp_path)
    yield addr
    proc.kill()
    proc.wait()


@pytest.fixture()
def campus(tmp_path):
    """A server with the campus preset; OTP mail lands as .eml files in (addr, mail folder)."""
    mail = tmp_path / "mail"
    proc, addr = _start(tmp_path, TALLY_PRESET="campus", TALLY_MAIL_TRANSPORT=f"file://{mail}")
    yield addr, mail
    proc.kill()
    proc.wait()


@pytest.fixture()
def http_server(tmp_path):
    """A server with its HTTP gateway on: yields (plain addr, HTTP addr, mail folder)."""
    mail = tmp_path / "mail"
    proc, plain, http = _start(
        tmp_path,
        TALLY_HTTP_LISTEN="127.0.0.1:0",
        TALLY_MAIL_TRANSPORT=f"file://{mail}",
        TALLY_OTP_TRANSFER_MIN="100",
    )
    yield plain, http, mail
    proc.kill()
    proc.wait()
