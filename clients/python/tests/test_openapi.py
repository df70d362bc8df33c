"""The OpenAPI document against the real server, checked by schemathesis:
every op is called with arguments made from its schema (and with broken
ones), and every answer must be one the document describes: no 5xx, a
documented status, JSON as described, and broken arguments refused."""

import json
import pathlib
import re
import subprocess
import sys
import urllib.request

from conftest import ADMIN_PASSWORD
from tally import Client

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)


def test_the_server_answers_as_its_openapi_document_says(http_server):
    plain, (host, port), _ = http_server
    with Client(*plain) as c:
        c.login("admin", ADMIN_PASSWORD)
        # A key, not a token: a generated `logout` must not end the run's credential.
        key = c.create_key("schemathesis", "admin")["secret"]
        c.create_account("alice", initial=1000)
    schemathesis = pathlib.Path(sys.executable).parent / "schemathesis"
    run = subprocess.run(
        [
            str(schemathesis), "run", f"http://{host}:{port}/v1/openapi.json",
            "--header", f"X-Tally-Key: {key}",
            "--checks", CHECKS,
            "--max-examples", "10",
            # A fixed seed: the same cases each run (a wider search is one
            # flag away: --seed N --max-examples 100).
            "--seed", "20261201",
        ],
        capture_output=True, text=True, timeout=900,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", out)
    assert generated and generated.group(1) == generated.group(2) and int(generated.group(1)) > 1000, out[-3000:]
    with urllib.request.urlopen(f"http://{host}:{port}/v1/openapi.json") as r:
        paths = json.load(r)["paths"]
    assert len(paths) == 47  # 45 ops and /healthz, /readyz
    tested = re.search(r"Tested: (\d+)\b", out)
    assert tested and int(tested.group(1)) == len(paths), out[-3000:]
    # The server is still there, and still adds up.
    with Client(*plain) as c:
        c.login("admin", ADMIN_PASSWORD)
        assert c.audit()["sum"] == 0
