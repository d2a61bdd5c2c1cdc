"""Issue 14.7: the portal's secrets stay out of reach of its scheduler.

``grid-portal serve`` is two processes (grid_portal/portal/scheduler_link.py): the enrolment
process holds the CA key and the join tokens; the scheduler process never loads them. Checked
on a real portal: the scheduler process has no descriptor or mapping of ``ca-key.pem``; code the
admin runs inside it finds no CA key object, no PEM of it and no token store; its memory holds
none of the key's bytes (while the enrolment process's does, which shows the scan works); the
channel between them signs renewals of enrolled people only, whatever the scheduler asks; and
either process ending ends the other, the port freed for a restart on the same data dir.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Portal, researcher_connection, start_portal, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


def _key_facts(data_dir: Path) -> dict[str, Any]:
    """What identifies the CA's private key: its PEM lines and its scalar's bytes."""
    from cryptography.hazmat.primitives import serialization

    pem = (data_dir / "ca" / "ca-key.pem").read_text()
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    scalar = key.private_numbers().private_value  # type: ignore[union-attr]
    size = (scalar.bit_length() + 7) // 8
    body = [line for line in pem.splitlines() if line and not line.startswith("-----")]
    return {
        "pem_lines": [line for line in body if len(line) >= 40],
        "line_digests": [_digest(line) for line in body if len(line) >= 40],
        "scalar_digest": _digest(scalar.to_bytes(size, "big")),
        "scalar_bytes": [scalar.to_bytes(size, "big"), scalar.to_bytes(size, "little")],
    }


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _scan_objects(line_digests: list[str], scalar_digest: str) -> list[str]:
    """Run inside a process (the portal's scheduler, by its admin): every live Python object
    that is the CA's key, holds its PEM text, or is a CA or token store of the portal. Keys
    and strings are not tracked by the garbage collector themselves: they are found as what
    tracked objects refer to. Only digests of what to look for are sent, so that the search
    does not bring the key's text into the process it searches."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    wanted = set(line_digests)
    found = set()
    for obj in gc.get_objects():
        kind = type(obj).__name__
        if kind in ("CertificateAuthority", "TokenStore", "PortalContext"):
            found.add(f"a {kind}")
        for value in (obj, *gc.get_referents(obj)):
            if isinstance(value, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
                scalar = value.private_numbers().private_value
                if _digest(scalar.to_bytes((scalar.bit_length() + 7) // 8, "big")) == scalar_digest:
                    found.add("the CA key object")
            elif isinstance(value, (str, bytes)) and len(value) >= 40:
                text = value if isinstance(value, str) else value.decode("latin-1")
                if any(_digest(line.strip()) in wanted for line in text.splitlines()):
                    found.add("the CA key's PEM text")
    return sorted(found)


def _scheduler_sees_plugin(dask_scheduler: Any) -> bool:
    return "grid-portal" in dask_scheduler.plugins


def _scan_memory(pid: int, needles: list[bytes]) -> list[str]:
    """Which needles are anywhere in the process's writable memory (/proc/PID/mem)."""
    hits: set[str] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            span, perms = fields[0], fields[1]
            if not perms.startswith("rw"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            if end - start > 2**30:
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for n, needle in enumerate(needles):
                if needle in data:
                    hits.add(f"needle {n}")
    return sorted(hits)


def _pids(portal: Portal) -> tuple[int, int]:
    info = json.loads((portal.data_dir / "portal.json").read_text())
    return info["pid"], info["scheduler_pid"]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Any:
    p = start_portal(tmp_path_factory.mktemp("apart"))
    yield p
    p.stop()


def test_the_scheduler_process_never_loads_the_ca_key(portal: Portal, tmp_path: Path) -> None:
    enrolment_pid, scheduler_pid = _pids(portal)
    assert enrolment_pid == portal.process.pid != scheduler_pid
    ppid = int(Path(f"/proc/{scheduler_pid}/stat").read_text().rpartition(")")[2].split()[1])
    assert ppid == enrolment_pid, "the scheduler runs in a child of `grid-portal serve`"
    key_file = str((portal.data_dir / "ca" / "ca-key.pem").resolve())

    # No open descriptor, no mapping of the key file.
    fd_dir = Path(f"/proc/{scheduler_pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            targets.append(os.readlink(fd))
    assert key_file not in targets and not any("ca-key" in t for t in targets)
    assert "ca-key" not in Path(f"/proc/{scheduler_pid}/maps").read_text()

    # The strong check: the admin runs code in the scheduler and looks for the key.
    facts = _key_facts(portal.data_dir)
    with portal.grid() as admin:
        assert admin.client.run_on_scheduler(_scheduler_sees_plugin)  # the code does run there
        found = admin.client.run_on_scheduler(
            _scan_objects,
            line_digests=facts["line_digests"],
            scalar_digest=facts["scalar_digest"],
        )
    assert found == []
    # The same scan here, where the key is loaded, finds it: the scan would have seen it.
    from grid_portal.portal.security import CertificateAuthority

    ca = CertificateAuthority.load_or_create(portal.data_dir / "ca")
    mine = _scan_objects(facts["line_digests"], facts["scalar_digest"])
    assert "the CA key object" in mine and "the CA key's PEM text" in mine
    del ca

    # Nor anywhere in its memory: not the key's bytes, not its PEM text. The enrolment
    # process, which holds the CA, has the scalar in memory: the scan works.
    needles = [*facts["scalar_bytes"], *(line.encode() for line in facts["pem_lines"])]
    try:
        in_enrolment = _scan_memory(enrolment_pid, needles)
        in_scheduler = _scan_memory(scheduler_pid, needles)
    except PermissionError:
        pytest.skip("reading another process's memory is not allowed here (ptrace scope)")
    assert in_enrolment, "the scan should find the CA key in the process that holds it"
    assert in_scheduler == []


async def _ask_enrolment(dask_scheduler: Any, csr: str, name: str, role: str) -> dict[str, Any]:
    """What a compromised scheduler could do: ask the enrolment process to sign anything."""
    channel = dask_scheduler.plugins["grid-portal"].renewals.__self__
    return await channel.request("renew", csr=csr, name=name, role=role)


def test_the_enrolment_process_signs_only_renewals_of_enrolled_people(
    portal: Portal, tmp_path: Path
) -> None:
    from cryptography import x509

    from grid_portal import Grid
    from grid_portal.connection import Connection
    from grid_portal.keys import make_key_and_csr
    from grid_portal.portal.ledger import LEDGER_FILE, EnrolmentBook

    _, csr = make_key_and_csr("whoever")
    admin_name = Connection.load(Path(portal.connection_file)).name
    researcher_connection(portal, tmp_path, "rita")
    asks = {
        ("mallory", "admin"): "not renewed",
        (admin_name, "admin"): "not renewed",
        ("portal-scheduler", "scheduler"): "not renewed",
        ("node-1", "node"): "not renewed",
        ("nobody", "client"): "never enrolled",
    }
    with portal.grid() as admin:
        for (name, role), why in asks.items():
            answer = admin.client.run_on_scheduler(_ask_enrolment, csr=csr, name=name, role=role)
            assert "cert" not in answer and why in answer["error"], (name, role, answer)
        # An enrolled person is renewed (what a due Grid does), for that name and role only.
        answer = admin.client.run_on_scheduler(_ask_enrolment, csr=csr, name="rita", role="client")
    cert = x509.load_pem_x509_certificate(answer["cert"].encode())
    assert cert.subject.rfc4514_string().startswith("CN=rita") or "rita" in str(cert.subject)
    book = EnrolmentBook(portal.data_dir / LEDGER_FILE)
    enrolment = book.get("rita", "client")
    assert enrolment is not None and enrolment.serial == format(cert.serial_number, "x")

    # Through the real path: the researcher's own grid_renew, then refused once revoked.
    from grid_portal.errors import NotAllowed

    with Grid(str(tmp_path / "rita.json"), start_embedded=False) as grid:
        _, csr2 = make_key_and_csr("rita")
        assert "BEGIN CERTIFICATE" in grid._call("grid_renew", csr=csr2)["cert"]
        book.revoke("rita", "client")
        time.sleep(1.5)  # the gate's copy of the revocations is refreshed every second
        with pytest.raises(NotAllowed):
            grid._call("grid_renew", csr=csr2)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_either_process_ending_ends_both(tmp_path: Path) -> None:
    # The scheduler process dies: `grid-portal serve` stops, with an error.
    first = start_portal(tmp_path)
    try:
        parent, child = _pids(first)
        os.kill(child, signal.SIGKILL)
        code = first.process.wait(30)
        assert code != 0
        assert "scheduler process ended unexpectedly" in first.log.read_text()
        assert not (first.data_dir / "portal.json").exists()
    finally:
        first.stop()

    # Restarted on the same data dir, the same CA; then the enrolment process dies (kill -9):
    # the scheduler process goes with it and its port is free at once.
    ca_before = (first.data_dir / "ca" / "ca.pem").read_text()
    second = start_portal(tmp_path)
    try:
        assert (second.data_dir / "ca" / "ca.pem").read_text() == ca_before
        parent, child = _pids(second)
        port = int(second.scheduler.rpartition(":")[2])
        second.process.kill()
        second.process.wait(30)
        wait_for(lambda: not _alive(child), timeout=10, what="the scheduler process to end")
        wait_for(lambda: _port_free(port), timeout=10, what="the scheduler's port to be free")
    finally:
        second.stop()

    # And SIGTERM stops both in order, exit code 0.
    third = start_portal(tmp_path)
    _, child = _pids(third)
    third.process.send_signal(signal.SIGTERM)
    assert third.process.wait(30) == 0
    assert not _alive(child)


def test_token_create_and_enrolment_still_work(portal: Portal, tmp_path: Path) -> None:
    """`grid-portal token create` reads the data dir itself; the enrolment process redeems
    the token over HTTPS and signs; the status page is relayed on the same URL."""
    from grid_portal.enrolment import pinned_context as pinned
    from grid_portal.enrolment import post_json, request
    from grid_portal.keys import make_key_and_csr

    ca_pem = (portal.data_dir / "ca" / "ca.pem").read_text()
    token = portal.token("--for", "client", "--uses", "1")
    _, csr = make_key_and_csr("rosa")
    reply = post_json(
        f"{portal.http}/api/enrol", ca_pem, {"token": token, "csr": csr, "name": "rosa"}, "enrol"
    )
    assert reply["role"] == "client" and reply["name"] == "rosa"
    assert reply["scheduler"].endswith(portal.scheduler.rpartition(":")[2])
    status = json.loads(request(f"{portal.http}/status.json", pinned(ca_pem)))
    assert "capacity" in status and "contributions" in status
    page = request(f"{portal.http}/status", pinned(ca_pem)).decode()
    assert "<html" in page.lower()
