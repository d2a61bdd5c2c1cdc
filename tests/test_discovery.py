"""Issue 19: portals found on the LAN (DNS-SD), and joining with no token (a join request the
admin approves after comparing the pairing code).

Two network namespaces of our own, joined by a veth pair, stand for two machines on a LAN: the
portal in one, volunteers and researchers in the other. Multicast and every other packet stay
between these two namespaces (never the machine's own interfaces). Skipped, saying why, when
namespaces cannot be made here (not root, no `ip`).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, grid_portal_command, wait_for
from lan_impostor import impostor_command
from netns import _ip, why_namespaces_unavailable

_WHY = why_namespaces_unavailable()
if _WHY:
    print(f"test_discovery skipped: {_WHY}", file=sys.stderr)
pytestmark = pytest.mark.timeout(120)
needs_namespaces = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

_COUNTER = itertools.count()
CODE = re.compile(r"pairing code: (\d{3} \d{3})")


@dataclass
class Lan:
    portal_ns: str
    guest_ns: str
    portal_ip: str
    guest_ip: str

    def run(self, ns: str, *args: str, timeout: float = 60, **kw: Any) -> Any:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *grid_portal_command(*args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def popen(self, ns: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(
                ["ip", "netns", "exec", ns, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )


def _lan() -> Iterator[Lan]:
    n = (os.getpid() + next(_COUNTER) * 7) % 200 + 20
    tag = f"{os.getpid() % 10000}{next(_COUNTER)}"
    lan = Lan(f"gpda{tag}", f"gpdb{tag}", f"10.201.{n}.1", f"10.201.{n}.2")
    a_link, b_link = f"gpda{tag}", f"gpdb{tag}"
    try:
        _ip("netns", "add", lan.portal_ns)
        _ip("netns", "add", lan.guest_ns)
        _ip("link", "add", a_link, "type", "veth", "peer", "name", b_link)
        _ip("link", "set", a_link, "netns", lan.portal_ns)
        _ip("link", "set", b_link, "netns", lan.guest_ns)
        for ns, link, ip in (
            (lan.portal_ns, a_link, lan.portal_ip),
            (lan.guest_ns, b_link, lan.guest_ip),
        ):
            # Loopback first: without it, joining the mDNS multicast group fails (ENODEV).
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("addr", "add", f"{ip}/24", "dev", link, netns=ns)
            _ip("link", "set", link, "up", netns=ns)
        yield lan
    finally:
        subprocess.run(["ip", "netns", "del", lan.portal_ns], capture_output=True)
        subprocess.run(["ip", "netns", "del", lan.guest_ns], capture_output=True)


@dataclass
class LanPortal:
    lan: Lan
    data_dir: Path
    process: subprocess.Popen[bytes]
    info: dict[str, Any]
    log: Path
    name: str

    def admin(self, *args: str) -> Any:
        """`grid-portal requests ...` / `certs ...`: file-based, on the portal's data dir."""
        out = subprocess.run(
            grid_portal_command(*args, "--data-dir", str(self.data_dir)),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    def requests(self) -> list[dict[str, Any]]:
        return json.loads(self.admin("requests", "--json"))

    def enrolled_names(self) -> set[str]:
        return {r["name"] for r in json.loads(self.admin("certs", "list", "--json"))}

    def node_names(self) -> set[str]:
        out = self.lan.run(
            self.lan.portal_ns,
            "nodes",
            "--json",
            "--portal",
            str(self.data_dir / "connection.json"),
        )
        assert out.returncode == 0, out.stderr
        return {n["name"] for n in json.loads(out.stdout) if n["state"] != "offline"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_lan_portal(lan: Lan, tmp: Path, *extra: str, name: str = "") -> LanPortal:
    tmp.mkdir(parents=True, exist_ok=True)
    name = name or f"Test Portal {os.getpid()}"
    data_dir, log = tmp / "portal", tmp / "portal.log"
    process = lan.popen(
        lan.portal_ns,
        log,
        *grid_portal_command(
            "serve",
            "--host",
            lan.portal_ip,
            "--port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(data_dir),
            "--telemetry-interval",
            "0.5",
            "--announce-name",
            name,
            *extra,
        ),
    )

    def ready() -> dict[str, Any] | None:
        if process.poll() is not None:
            raise AssertionError(f"portal exited early:\n{log.read_text()}")
        path = data_dir / "portal.json"
        info = json.loads(path.read_text()) if path.exists() else None
        return info if info and info.get("pid") == process.pid else None

    info = wait_for(ready, timeout=30, what="the portal to start")
    return LanPortal(lan, data_dir, process, info, log, name)


def discover(lan: Lan, timeout: float = 2.0) -> list[dict[str, Any]]:
    out = lan.run(lan.guest_ns, "discover", "--json", "--timeout", str(timeout))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 9)
        process.wait(10)


def read_code(log: Path, process: subprocess.Popen[bytes]) -> str:
    def code() -> str | None:
        if process.poll() is not None:
            raise AssertionError(f"exited early:\n{log.read_text()}")
        found = CODE.search(log.read_text(errors="replace"))
        return found.group(1).replace(" ", "") if found else None

    return wait_for(code, timeout=30, what=f"a pairing code in {log.name}")


def volunteer_command(tmp: Path, name: str, *extra: str) -> list[str]:
    return grid_portal_command(
        "volunteer",
        "--name",
        name,
        "--state-dir",
        str(tmp / f"state-{name}"),
        "--cpus",
        "1",
        "--memory",
        "1GB",
        "--reconnect-max",
        "2s",
        "--discover-timeout",
        "2",
        *extra,
    )


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    if _WHY:
        pytest.skip(_WHY)
    yield from _lan()


@pytest.fixture(scope="module")
def lan_portal(lan: Lan, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LanPortal]:
    portal = start_lan_portal(lan, tmp_path_factory.mktemp("lanportal"))
    yield portal
    portal.stop()


# -- the tests --------------------------------------------------------------------------------


def test_discover_finds_the_announced_portal(lan_portal: LanPortal) -> None:
    t0 = time.monotonic()
    found = wait_for(lambda: discover(lan_portal.lan), timeout=20, what="an announcement")
    print(f"found in {time.monotonic() - t0:.1f} s: {found}")
    assert len(found) == 1
    p = found[0]
    assert p["name"] == lan_portal.name
    assert p["addresses"] == [lan_portal.lan.portal_ip]
    assert p["url"] == lan_portal.info["http"]
    assert p["ca_fingerprint"] == lan_portal.info["ca_fingerprint"]  # the full SHA-256
    assert p["verified"] is True and p["problem"] is None
    assert p["nodes_online"] == 0
    assert p["status_url"].endswith("/status") and p["version"]


def test_join_request_approved_joins_and_a_code_mismatch_is_denied(
    lan_portal: LanPortal, tmp_path: Path
) -> None:
    lan = lan_portal.lan
    log = tmp_path / "volunteer.log"
    volunteer = lan.popen(lan.guest_ns, log, *volunteer_command(tmp_path, "lanvol", "--yes"))
    # Someone else on the LAN asks too (as a researcher, with a key of its own).
    intruder_log = tmp_path / "intruder.log"
    intruder = lan.popen(
        lan.guest_ns,
        intruder_log,
        *grid_portal_command(
            "login",
            "--yes",
            "--discover-timeout",
            "2",
            "--name",
            "intruder",
            "--output",
            str(tmp_path / "intruder.json"),
        ),
    )
    try:
        shown = read_code(log, volunteer)  # what the machine in front of the admin shows
        read_code(intruder_log, intruder)
        pending = wait_for(lambda: len(lan_portal.requests()) == 2 and lan_portal.requests())
        assert {r["role"] for r in pending} == {"node", "client"}
        matching = [r for r in pending if r["code"] == shown]
        assert len(matching) == 1 and matching[0]["name"] == "lanvol"
        other = next(r for r in pending if r["code"] != shown)
        lan_portal.admin("requests", "deny", other["id"])  # its code is not the one shown
        lan_portal.admin("requests", "approve", matching[0]["id"])
        wait_for(lambda: "lanvol" in lan_portal.node_names(), timeout=60, what="lanvol online")
        assert intruder.wait(30) == 2
        said = intruder_log.read_text()
        assert "denied" in said and "nothing was enrolled" in said, said
        assert not (tmp_path / "intruder.json").exists()
        enrolled = lan_portal.enrolled_names()
        assert "lanvol" in enrolled and "intruder" not in enrolled
        assert "Volunteering as lanvol" in log.read_text()
        assert lan_portal.requests() == []  # nothing left pending
    finally:
        stop(volunteer)
        stop(intruder)


def test_denied_request_joins_nothing(lan_portal: LanPortal, tmp_path: Path) -> None:
    lan = lan_portal.lan
    log = tmp_path / "volunteer.log"
    volunteer = lan.popen(lan.guest_ns, log, *volunteer_command(tmp_path, "refused", "--yes"))
    try:
        code = read_code(log, volunteer)
        request = wait_for(
            lambda: [r for r in lan_portal.requests() if r["name"] == "refused"], timeout=20
        )[0]
        assert request["code"] == code
        lan_portal.admin("requests", "deny", request["id"])
        assert volunteer.wait(30) == 2
        said = log.read_text()
        assert "denied" in said and "nothing was enrolled" in said, said
        assert "refused" not in lan_portal.enrolled_names()
        assert "refused" not in lan_portal.node_names()
        assert not list((tmp_path / "state-refused").glob("*/node.json"))
    finally:
        stop(volunteer)


def start_impostor(lan_portal: LanPortal, tmp_path: Path) -> subprocess.Popen[bytes]:
    """A second announcer: it claims the real portal's enrolment endpoint, under a CA
    fingerprint of its own."""
    lan = lan_portal.lan
    port = lan_portal.info["http"].rsplit(":", 1)[1]
    log = tmp_path / "impostor.log"
    impostor = lan.popen(lan.portal_ns, log, *impostor_command(lan.portal_ip, port))
    try:
        wait_for(lambda: "announced" in log.read_text(), timeout=20, what="the impostor")
    except BaseException:
        stop(impostor)
        raise
    return impostor


def test_announcer_with_another_ca_fingerprint_is_refused(
    lan_portal: LanPortal, tmp_path: Path
) -> None:
    lan = lan_portal.lan
    impostor = start_impostor(lan_portal, tmp_path)
    try:
        found = {p["name"]: p for p in discover(lan)}
        assert set(found) == {lan_portal.name, "Impostor"}, found
        assert found["Impostor"]["verified"] is False
        assert "does not match" in found["Impostor"]["problem"]
        assert found[lan_portal.name]["verified"] is True
        before = lan_portal.admin("requests", "--all", "--json")
        out = lan.run(
            lan.guest_ns, *volunteer_command(tmp_path, "fooled", "--portal", "Impostor")[3:]
        )
        assert out.returncode == 2, out.stdout + out.stderr
        assert "is not what it claims" in out.stderr and "Nothing was sent" in out.stderr
        assert "type the portal's address instead" in out.stderr
        assert lan_portal.admin("requests", "--all", "--json") == before  # nothing sent
        assert "fooled" not in lan_portal.enrolled_names()
        # Without --portal, the impostor is left out, and the real portal needs a --yes.
        out = lan.run(lan.guest_ns, *volunteer_command(tmp_path, "fooled")[3:])
        assert out.returncode == 2
        assert "Not trusted" in out.stdout and "Impostor" in out.stdout
        assert "found one portal" in out.stderr and "--yes" in out.stderr
    finally:
        stop(impostor)


@needs_namespaces
def test_no_announce_is_not_found(tmp_path: Path) -> None:
    for lan in _lan():
        portal = start_lan_portal(lan, tmp_path, "--no-announce", name="Quiet")
        try:
            time.sleep(1.0)  # an announcement would be out by now
            assert discover(lan) == []
            out = lan.run(lan.guest_ns, *volunteer_command(tmp_path, "lost", "--yes")[3:])
            assert out.returncode == 2
            said = out.stderr
            assert "no Grid Portal announced itself" in said, said
            assert "type the portal's address instead" in said
        finally:
            portal.stop()


CALL = """
import json, sys, urllib.error, urllib.request
method, url, token = sys.argv[1:4]
req = urllib.request.Request(
    url, method=method, data=b"{}" if method == "POST" else None,
    headers={"Authorization": "token " + token},
)
try:
    with urllib.request.urlopen(req, timeout=20) as reply:
        status, body = reply.status, reply.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
print(json.dumps({"status": status, "body": json.loads(body or b"null")}))
"""


UNSET = ("GRID_PORTAL_", "XDG_", "JUPYTERHUB_")  # what could name a portal for the server


@contextmanager
def jupyter_server_in(ns: str, tmp_path: Path) -> Iterator[Callable[..., tuple[int, Any]]]:
    """A Jupyter server with no portal configured, in namespace ``ns``; yields ``call(method,
    path)`` -> (HTTP status, JSON body), over real HTTP from inside that namespace."""
    port, token = 20000 + os.getpid() % 20000, "discovery-test-token"
    log = tmp_path / "jupyter.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                sys.executable,
                "-m",
                "jupyter_server",
                "--allow-root",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={port}",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={tmp_path}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # No saved login, no portal of this user's: the server browses the LAN.
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith(UNSET)},
                "HOME": str(tmp_path),
            },
        )

    def call(method: str, path: str) -> tuple[int, Any]:
        if server.poll() is not None:
            raise AssertionError(f"jupyter server exited:\n{log.read_text()}")
        url = f"http://127.0.0.1:{port}/grid/api/{path}"
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CALL, method, url, token],
            capture_output=True,
            text=True,
            timeout=40,
        )
        if out.returncode != 0:  # not listening yet
            raise ConnectionError(out.stderr[-500:])
        reply = json.loads(out.stdout)
        return reply["status"], reply["body"]

    try:
        wait_for(lambda: call("GET", "version"), timeout=60, what="the Jupyter server")
        yield call
    finally:
        stop(server)
        assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def test_jupyter_server_with_no_portal_lists_the_lan_portals_and_refuses_an_impostor(
    lan_portal: LanPortal, tmp_path: Path
) -> None:
    """Browsers cannot do mDNS: the Jupyter server browses (in the guest's namespace here),
    and says of a second announcer whose CA does not match what its endpoint serves that it
    is not trusted, what to do instead, and will not join it."""
    lan = lan_portal.lan
    impostor = start_impostor(lan_portal, tmp_path)
    before = lan_portal.admin("requests", "--all", "--json")
    try:
        with jupyter_server_in(lan.guest_ns, tmp_path) as call:

            def both() -> dict[str, Any] | None:
                status, body = call("GET", "discovered?refresh=true")
                assert status == 200, body
                names = {p["name"]: p for p in body["portals"]}
                return names if {lan_portal.name, "Impostor"} <= set(names) else None

            names = wait_for(both, timeout=60, interval=0.5, what="both announcements")
            real, fake = names[lan_portal.name], names["Impostor"]
            assert real["verified"] is True and real["message"] is None
            assert real["url"] == lan_portal.info["http"]
            assert fake["verified"] is False
            said = fake["message"]
            assert said.startswith("Not trusted: the portal announced as 'Impostor'"), said
            assert "does not match the fingerprint it announces" in said
            assert "Nothing was sent" in said and "grid-portal login https://" in said
            assert "restart JupyterLab" in said
            status, body = call("POST", f"discovered/{fake['id']}/join")
            assert (status, body["message"]) == (409, said), body
    finally:
        stop(impostor)
    assert lan_portal.admin("requests", "--all", "--json") == before  # nothing was sent


@needs_namespaces
def test_jupyter_server_on_a_machine_with_no_lan_says_how_to_type_the_url(
    tmp_path: Path,
) -> None:
    """No network to send multicast on (a container, here a namespace with loopback alone):
    one message with the way in by URL, never an error."""
    ns = f"gpdn{os.getpid() % 10000}{next(_COUNTER)}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "set", "lo", "up", netns=ns)
        with jupyter_server_in(ns, tmp_path) as call:
            status, body = call("GET", "discovered")
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert status == 200, body
    assert (body["configured"], body["portals"]) == (False, [])
    assert "no network but loopback" in body["message"], body
    assert "grid-portal login https://" in body["message"]


# -- the portal's book of join requests (no network needed) -----------------------------------


def test_join_requests_are_bounded_expire_and_are_decided_once(tmp_path: Path) -> None:
    from grid_portal import settings
    from grid_portal.discovery import csr_public_key_der, pairing_code
    from grid_portal.errors import EnrolmentRefused, UsageError
    from grid_portal.keys import make_key_and_csr
    from grid_portal.portal.join_requests import MAX_PENDING_PER_ADDRESS, JoinRequests
    from grid_portal.portal.security import CertificateAuthority

    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    book = JoinRequests(tmp_path / "ledger.sqlite")
    now = 1_000_000.0
    made = []
    for i in range(MAX_PENDING_PER_ADDRESS):
        _, csr = make_key_and_csr(f"m{i}")
        record, secret = book.create(f"m{i}", "node", csr, ca.cert_pem, "10.0.0.9", now=now)
        # The code both sides show: the requester computes it from the CA it fetched.
        assert record.code == pairing_code(ca.cert_pem, csr_public_key_der(csr))
        assert len(record.code) == 6 and record.code.isdigit()
        assert record.expires_at == now + settings.value("portal.join-request-ttl")
        made.append((record, secret))
    _, csr = make_key_and_csr("one-more")
    with pytest.raises(EnrolmentRefused, match="already has join requests waiting"):
        book.create("one-more", "node", csr, ca.cert_pem, "10.0.0.9", now=now)
    book.create("elsewhere", "client", csr, ca.cert_pem, "10.0.0.10", now=now)  # another address
    with pytest.raises(UsageError, match="'admin'"):
        book.create("boss", "admin", csr, ca.cert_pem, "10.0.0.11", now=now)
    assert len(book.list(now=now)) == MAX_PENDING_PER_ADDRESS + 1
    first, second = made[0][0], made[1][0]
    assert book.decide(first.id, approve=True, now=now + 1).state == "approved"
    with pytest.raises(UsageError, match="approved; nothing to decide"):
        book.decide(first.id, approve=False, now=now + 2)
    later = second.expires_at + 1
    with pytest.raises(UsageError, match="expired"):
        book.decide(second.id, approve=True, now=later)
    assert book.list(now=later) == []
    with pytest.raises(UsageError, match="no join request has id"):
        book.decide("nope", approve=True, now=now)
    found = book.by_secret(made[0][1])
    assert found is not None and found[0].id == first.id
    assert book.by_secret("wrong") is None


def test_join_requests_are_rate_limited_per_address(portal: Portal) -> None:
    """A flood of join requests from one address is cut off before anything is read or
    stored, whatever the requests held."""
    from grid_portal.keys import make_key_and_csr
    from grid_portal.portal.join_requests import REQUESTS_PER_MINUTE, JoinRequests

    statuses = [portal.enrol(b"not json", "join")[0] for _ in range(REQUESTS_PER_MINUTE)]
    assert statuses == [400] * REQUESTS_PER_MINUTE
    _, csr = make_key_and_csr("flood")
    request = {"csr": csr, "name": "flood", "role": "node"}
    status, body = portal.enrol(json.dumps(request).encode(), "join")
    assert status == 429 and "too many join requests" in body["error"], body
    assert JoinRequests(portal.data_dir / "ledger.sqlite").list() == []
