"""The container image, built and run for real with podman.

1. The image: a static, stripped binary on an empty base (docker/Dockerfile,
   target `prebuilt`), under 20 MB. Run with a volume: healthy by its own
   HEALTHCHECK, the server runs as uid 10001, text mode is off, a login,
   accounts and a transfer work through the published port, and they are
   all still there after the container restarts.
2. docker/compose.yaml as written, with two local images in place of the
   ones it names (no registry is reachable): the image above, and an SMTP
   relay stand-in (aiosmtpd on a debootstrapped Debian, cached under
   target/). The key made as its header says works over TLS, and a campus
   transfer is confirmed with the code that reached the relay.
3. docker/compose-cluster.yaml as written, with the image above: the three
   members form a cluster by themselves, a transfer through the leader
   reaches every member's chain, and with the leader's container stopped
   the other two elect another that serves the same ledger.

Run by tests/run-all.sh with the tests' Python venv (the Python client and
trustme). Skips, saying why, only when podman cannot run containers here.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import trustme

from tally import Client, ClusterClient, TallyError

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Where the musl build and the relay's base go: cargo's target folder (CI
# keeps it in a cache of its own, .ci/run).
TARGET_DIR = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")).resolve()
WORK = TARGET_DIR / "container-test"
TARGET = "x86_64-unknown-linux-musl"
BINARY = TARGET_DIR / TARGET / "container" / "tally"
IMAGE = "localhost/tally:test"
RELAY_IMAGE = "localhost/tally-smtp-standin:test"
RELAY_ROOTFS = WORK / "debian-bookworm-aiosmtpd.tar"
SIZE_GOAL = 20 * 1000 * 1000
PASSWORD = "container-test-password"
# A bound on every wait: a container that is not up by then is a failure.
WAIT_S = 60


def run(*args, check=True, **kw):
    """Runs a command, its output captured; a failure shows what it printed."""
    p = subprocess.run(args, text=True, capture_output=True, **kw)
    if check and p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(args)}\n{p.stdout}\n{p.stderr}")
    return p


def podman(*args, check=True):
    return run("podman", *args, check=check)


def until(what, check):
    """Polls `check` until it returns something truthy; fails after WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {WAIT_S} s: {what}")
        time.sleep(0.2)


def podman_can_run():
    """None if podman runs containers here, else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed (.ci/run installs it with apt-get)"
    p = podman("info", check=False)
    if p.returncode != 0:
        return f"`podman info` failed: {p.stderr.strip()[:400]}"
    return None


def configure():
    """The two settings this sandbox needs (setting rlimits is not permitted;
    crun refuses its cgroup layout), in a file of ours, not the machine's."""
    WORK.mkdir(parents=True, exist_ok=True)
    conf = WORK / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    os.environ["CONTAINERS_CONF"] = str(conf)


def build_binary():
    run("rustup", "target", "add", TARGET)
    run(
        "cargo", "build", "--profile", "container", "--target", TARGET, "--target-dir", str(TARGET_DIR),
        "--locked", "--bin", "tally", cwd=ROOT,
    )
    assert not program_interpreter(BINARY), "the binary asks for a dynamic loader"


def program_interpreter(path):
    """Whether an ELF executable names a loader (a PT_INTERP program
    header): a static one does not, and an empty base has none to offer."""
    data = pathlib.Path(path).read_bytes()
    assert data[:5] == b"\x7fELF\x02", "not a 64-bit ELF file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def build_image():
    with tempfile.TemporaryDirectory() as ctx:
        ctx = pathlib.Path(ctx)
        shutil.copy(BINARY, ctx / "tally")
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", ctx / "ca-certificates.crt")
        (ctx / "data").mkdir()
        podman(
            "build", "--format", "docker", "-f", str(ROOT / "docker" / "Dockerfile"),
            "--target", "prebuilt", "-t", IMAGE, str(ctx),
        )
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    print(f"image {IMAGE}: {size} bytes ({size / 1e6:.1f} MB); binary {BINARY.stat().st_size} bytes")
    assert size < SIZE_GOAL, f"image is {size} bytes, the goal is under {SIZE_GOAL}"
    return size


def inspect(container, fmt):
    return podman("inspect", "--format", fmt, container).stdout.strip()


def healthy(container):
    """Runs the image's HEALTHCHECK until it passes (podman runs it on a timer
    only under systemd), then reads the status podman recorded."""
    until(f"{container} healthy", lambda: podman("healthcheck", "run", container, check=False).returncode == 0)
    status = inspect(container, "{{.State.Health.Status}}")
    assert status == "healthy", status


def answers_smtp(container):
    """Waits until the relay container runs and greets an SMTP client on
    its network address. Tally resolves the relay by its service name,
    which exists only once the container runs; a transfer's code mailed
    before that fails (seen once in CI: "Name does not resolve")."""
    def greets():
        if podman("inspect", "--format", "{{.State.Running}}", container, check=False).stdout.strip() != "true":
            return False
        ip = inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        try:
            with socket.create_connection((ip, 1025), timeout=2) as s:
                s.settimeout(2)
                return s.recv(3) == b"220"
        except OSError:
            return False
    until(f"{container} answering SMTP", greets)


def uids(container):
    """The real, effective, saved and filesystem uids of the container's
    main process, read from the host."""
    pid = inspect(container, "{{.State.Pid}}")
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return [int(u) for u in re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()]


def published(container, port):
    host, _, p = podman("port", container, f"{port}/tcp").stdout.strip().splitlines()[0].rpartition(":")
    return host, int(p)


def text_mode_is_off(addr):
    """A line of text is not a command here: the server reads its first four
    bytes as a frame length and refuses it, in MessagePack, not JSON."""
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(b"ping\n")
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    assert b"pong" not in got and not got.startswith(b"{"), got
    assert b"frame_too_large" in got, got


def image_test():
    name = f"tally-test-{os.getpid()}"
    volume = f"{name}-data"
    try:
        podman(
            "run", "-d", "--name", name, "-p", "127.0.0.1::7707", "-v", f"{volume}:/data",
            "-e", f"TALLY_AUTH_ADMIN_PASSWORD={PASSWORD}", IMAGE,
        )
        healthy(name)
        assert uids(name) == [10001] * 4, uids(name)
        addr = published(name, 7707)
        text_mode_is_off(addr)
        with Client(*addr) as c:
            assert c.login("admin", PASSWORD)["role"] == "admin"
            c.create_account("alice", initial=100)
            c.create_account("bob")
            t = c.transfer("bob", 30, from_="alice", memo="lunch")
            assert (t["from_balance"], t["to_balance"]) == (70, 30), t
            transfer_id = t["id"]

        podman("restart", name)
        healthy(name)
        addr = published(name, 7707)
        with Client(*addr) as c:
            c.login("admin", PASSWORD)
            assert (c.balance("alice")["balance"], c.balance("bob")["balance"]) == (70, 30)
            got = c.get_transfer(transfer_id)
            assert (got["from"], got["to"], got["amount"], got["memo"]) == ("alice", "bob", 30, "lunch"), got
            audit = c.audit()
            assert (audit["sum"], audit["chain_ok"]) == (0, True), audit
        print("image: healthy, uid 10001, text mode off, data kept across a restart")
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)
        podman("volume", "rm", "-f", volume, check=False)


def relay_image():
    """An SMTP relay stand-in for compose.yaml's mailpit: aiosmtpd printing
    every message to its log, on a Debian made with debootstrap (cached)."""
    if not RELAY_ROOTFS.exists():
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            rootfs = pathlib.Path(tmp) / "rootfs"
            run(
                "debootstrap", "--variant=minbase", "--include=python3-aiosmtpd", "bookworm",
                str(rootfs), "http://deb.debian.org/debian",
            )
            partial = RELAY_ROOTFS.with_suffix(".partial")
            run("tar", "-C", str(rootfs), "-cf", str(partial), ".")
            partial.rename(RELAY_ROOTFS)
    podman(
        "import",
        "--change", 'CMD ["python3", "-u", "-m", "aiosmtpd", "-n", "-l", "0.0.0.0:1025"]',
        "--change", "USER nobody",
        "--change", "EXPOSE 1025",
        str(RELAY_ROOTFS), RELAY_IMAGE,
    )


def compose_test():
    relay_image()
    project = f"tallytest{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        certs = tmp / "certs"
        certs.mkdir()
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        leaf.private_key_pem.write_to_path(str(certs / "key.pem"))
        with open(certs / "cert.pem", "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        # As compose.yaml's header says: readable by the image's user.
        os.chmod(certs, 0o755)
        os.chmod(certs / "cert.pem", 0o644)
        os.chown(certs / "key.pem", 10001, -1)
        os.chmod(certs / "key.pem", 0o400)
        ca_file = tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        override = tmp / "local-images.yaml"
        override.write_text(
            json.dumps({"services": {"tally": {"image": IMAGE}, "smtp": {"image": RELAY_IMAGE}}})
        )
        compose = [
            "podman-compose", "-p", project,
            "-f", str(ROOT / "docker" / "compose.yaml"), "-f", str(override),
        ]
        env = dict(os.environ, TALLY_CERTS=str(certs))
        try:
            # Step 2 of compose.yaml's header: a key, made on the stopped volume.
            made = run(*compose, "run", "--rm", "--no-deps", "tally", "admin", "create-key", "--data", "/data",
                       "--name", "shop", "--role", "operator", env=env)
            secret = re.search(r"secret (tally_[0-9a-f]{12}_[A-Za-z0-9_-]{43})", made.stdout).group(1)
            run(*compose, "up", "-d", env=env)
            tally, relay = f"{project}_tally_1", f"{project}_smtp_1"
            healthy(tally)
            answers_smtp(relay)
            tls = ("127.0.0.1", 7708)
            with Client(*tls, tls=True, ca=str(ca_file)) as app:
                assert app.auth(key=secret)["role"] == "operator"
            mountpoint = inspect(f"{project}_tally-data", "{{.Mountpoint}}")
            admin_password = pathlib.Path(mountpoint, "admin.password").read_text().strip()
            campus_transfer(tls, str(ca_file), admin_password, relay)
            print("compose: key over TLS, campus transfer confirmed with the relayed code")
        finally:
            run(*compose, "down", "-v", "-t", "5", env=env, check=False)


CLUSTER_MEMBERS = {"tally-1": "127.0.0.1:7707", "tally-2": "127.0.0.1:7717", "tally-3": "127.0.0.1:7727"}


def member_hello(addr):
    try:
        host, port = addr.split(":")
        with Client(host, int(port), timeout=5) as c:
            return c.call("hello")
    except (OSError, TallyError):
        return None


def audits(token, services):
    """Every named member's own `audit` (None where it does not answer)."""
    out = []
    for name in services:
        host, port = CLUSTER_MEMBERS[name].split(":")
        try:
            with Client(host, int(port), timeout=5) as c:
                c.auth(token=token)
                out.append(c.audit())
        except (OSError, TallyError):
            out.append(None)
    return out


def compose_cluster_test():
    project = f"tallycluster{os.getpid()}"
    with tempfile.TemporaryDirectory() as tmp:
        override = pathlib.Path(tmp) / "local-image.yaml"
        override.write_text(json.dumps({"services": {name: {"image": IMAGE} for name in CLUSTER_MEMBERS}}))
        compose = [
            "podman-compose", "-p", project,
            "-f", str(ROOT / "docker" / "compose-cluster.yaml"), "-f", str(override),
        ]
        # As the file's header says: the secret and the password from the environment.
        env = dict(os.environ, TALLY_CLUSTER_SECRET=os.urandom(32).hex(), TALLY_AUTH_ADMIN_PASSWORD=PASSWORD)
        try:
            run(*compose, "up", "-d", env=env)
            members = list(CLUSTER_MEMBERS.values())
            leader_addr = until("a leader", lambda: next(
                (a for a in members if (member_hello(a) or {}).get("role") == "leader"), None))
            with ClusterClient(members, patience=WAIT_S) as cluster:
                token = cluster.call("login", user="admin", password=PASSWORD)["token"]
                cluster.token = token
                cluster.call("create_account", account="a", initial=100)
                cluster.call("create_account", account="b")
                paid = cluster.call("transfer", **{"from": "a", "to": "b", "amount": 30, "key": "compose-1"})
            want = audits(token, [n for n, a in CLUSTER_MEMBERS.items() if a == leader_addr])[0]
            assert want["transfers"] == 2 and want["chain_ok"], want
            until("every member's chain at the leader's", lambda: audits(token, CLUSTER_MEMBERS) == [want] * 3)

            # The leader's container stopped: the other two go on.
            old = next(n for n, a in CLUSTER_MEMBERS.items() if a == leader_addr)
            podman("stop", "-t", "0", f"{project}_{old}_1")
            rest = [a for n, a in CLUSTER_MEMBERS.items() if n != old]
            until("a new leader", lambda: next(
                (a for a in rest if (member_hello(a) or {}).get("role") == "leader"), None))
            with ClusterClient(rest, token=token, patience=WAIT_S) as cluster:
                assert cluster.call("get_transfer", id=paid["id"])["amount"] == 30
                cluster.call("transfer", **{"from": "b", "to": "a", "amount": 5, "key": "compose-2"})
                assert cluster.balance("a")["balance"] == 75
            print(f"compose cluster: formed, replicated to all three, {old} stopped and another leads")
        finally:
            run(*compose, "down", "-v", "-t", "5", env=env, check=False)


def campus_transfer(addr, ca, admin_password, relay):
    with Client(*addr, tls=True, ca=ca) as admin, Client(*addr, tls=True, ca=ca) as ann:
        admin.login("admin", admin_password)
        for user in ("ann", "ben"):
            ann.signup(user, user.title(), f"{user}@campus.example", PASSWORD, group="Y24")
            admin.set_events(user, 6)
        admin.mint("ann", 100)
        ann.login("ann", PASSWORD)
        pending = ann.transfer("ben", 100)
        if pending["delivered"] is not True:
            print(podman("logs", relay, check=False).stdout[-2000:], file=sys.stderr)
        assert pending["delivered"] is True, pending
        code = until("the code at the relay", lambda: relayed_code(relay))
        try:
            ann.confirm(pending["pending"], "000000" if code != "000000" else "111111")
            raise AssertionError("a wrong code was accepted")
        except TallyError as e:
            assert e.code == "otp_invalid", e
        done = ann.confirm(pending["pending"], code)
        # Same group: a 2% fee, rounded up, taken from what arrives.
        assert (done["amount"], done["fee"], done["from_balance"], done["to_balance"]) == (100, 2, 0, 98), done
        assert admin.audit()["sum"] == 0


def relayed_code(relay):
    logs = podman("logs", relay, check=False).stdout
    found = re.findall(r"code is (\d{6})", logs)
    return found[-1] if found else None


def main():
    why = podman_can_run()
    if why:
        print(f"SKIPPED: the container tests cannot run here: {why}")
        return
    configure()
    build_binary()
    build_image()
    image_test()
    compose_test()
    compose_cluster_test()


if __name__ == "__main__":
    sys.exit(main())
