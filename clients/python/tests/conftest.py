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


def _start(tmp_path, **extra_env):
    env = dict(os.environ, TALLY_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, TALLY_LOG="warn", **extra_env)
    proc = subprocess.Popen(
        [_binary(), "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("tally listening on "), line
    host, port = line.rsplit(" ", 1)[1].rsplit(":", 1)
    return proc, (host, int(port))


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
