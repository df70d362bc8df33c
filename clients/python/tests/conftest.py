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


@pytest.fixture()
def server(tmp_path):
    env = dict(os.environ, TALLY_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD, TALLY_LOG="warn")
    proc = subprocess.Popen(
        [_binary(), "serve", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data")],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("tally listening on "), line
    host, port = line.rsplit(" ", 1)[1].rsplit(":", 1)
    yield host, int(port)
    proc.kill()
    proc.wait()
