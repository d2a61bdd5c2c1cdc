"""Zero trust, part 1: every certificate can do only what its role allows.

One portal and one honest volunteer (processes), with researchers Alice and Bob, teacher Tess
and a stolen node certificate. Every attempt goes over a real mutual-TLS connection with the
attacker's own certificate; nothing here calls a handler in-process. The hostile suite tries
every op each role may not use, on the portal's scheduler and on the volunteer's worker, and
writes the list of attempts to test-artifacts/hostile-attempts.txt.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Portal,
    grid_portal_command,
    researcher_connection,
    start_portal,
    start_volunteer,
    wait_for,
)
from gridtasks import where_and_what

from grid_portal import Grid
from grid_portal.connection import Connection
from grid_portal.errors import GridError
from grid_portal.protocol import (
    PUSH_OP,
    SCHEDULER_HANDLERS,
    SCHEDULER_STREAM_OPS,
    WORKER_HANDLERS,
    allowed,
)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@dataclass
class World:
    portal: Portal
    tmp: Path
    connections: dict[str, str]  # who -> connection file
    worker_address: str

    def security(self, who: str) -> Any:
        return Connection.load(Path(self.connections[who])).security()

    def grid(self, who: str) -> Grid:
        return Grid(self.connections[who], start_embedded=False)


def _node_connection(portal: Portal, tmp: Path, name: str) -> str:
    """A node certificate, as a volunteer's state dir holds one (stolen, or its own)."""
    return researcher_connection(portal, tmp, name, role="node")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("roles")
    portal = start_portal(tmp)
    try:
        start_volunteer(portal, tmp, "honest", "--cpus", "2", "--memory", "1GB")
        connections = {
            "alice": researcher_connection(portal, tmp, "alice"),
            "bob": researcher_connection(portal, tmp, "bob"),
            "tess": researcher_connection(portal, tmp, "tess", role="teacher"),
            "node": _node_connection(portal, tmp, "stolen-node"),
            "admin": portal.connection_file,
        }
        with portal.grid() as admin:
            address = next(n.address for n in admin.nodes() if n.name == "honest")
        yield World(portal, tmp, connections, address)
    finally:
        portal.stop()


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _call(address: str, security: Any, op: str, **args: Any) -> Any:
    """One request over a fresh mutual-TLS connection, as Dask's rpc makes it."""
    from distributed.comm import connect
    from distributed.core import send_recv

    comm = await connect(address, **security.get_connection_args("client"))
    try:
        return await send_recv(comm, op=op, **args)
    finally:
        await comm.close()


def _dask_handler_names() -> tuple[list[str], list[str], list[str]]:
    """Every request handler and stream op a Dask scheduler has, and a worker's handlers."""
    from distributed import Scheduler, Worker

    async def build() -> tuple[list[str], list[str], list[str]]:
        scheduler = Scheduler(dashboard=False, validate=False)
        worker = Worker("tcp://127.0.0.1:9", dashboard=False)
        return (
            sorted(scheduler.handlers),
            sorted(scheduler.stream_handlers),
            sorted(worker.handlers),
        )

    return asyncio.run(build())


def _grid_handler_names() -> list[str]:
    return sorted(n for n in SCHEDULER_HANDLERS if n.startswith("grid_"))


ROLE_OF = {"node": "node", "alice": "client", "tess": "teacher", "admin": "admin"}


def test_hostile_identities_are_refused_everything_their_role_may_not_use(world: World) -> None:
    """At least 100 attempts: for every role, each scheduler handler it may not call and each
    worker handler it may not call, over a real connection; all refused, nothing changed."""
    from grid_portal.errors import NotAllowed

    scheduler_ops, _, worker_ops = _dask_handler_names()
    scheduler_ops = sorted(set(scheduler_ops) | set(_grid_handler_names()))
    with world.grid("admin") as admin:
        before = admin.client.run_on_scheduler(_portal_state)
    attempts: list[str] = []
    let_through: list[str] = []

    async def attempt(role: str, where: str, address: str, security: Any, op: str) -> None:
        try:
            answer = await _call(address, security, op)
        except NotAllowed as refused:
            attempts.append(f"{role:8} {where:7} {op:32} refused: {refused}")
        except Exception as other:  # noqa: BLE001 - reported below, with the op
            let_through.append(f"{role} {where} {op}: {other!r}")
        else:
            if op == "register-client" and "refused" in str(answer):  # Dask's stream-start
                attempts.append(f"{role:8} {where:7} {op:32} {answer[0]['error']}")
            elif op == "register-worker" and answer.get("status") == "error":  # Dask's format
                attempts.append(f"{role:8} {where:7} {op:32} refused: {answer['message']}")
            else:
                let_through.append(f"{role} {where} {op}: answered {str(answer)[:80]}")

    async def attack() -> None:
        for who, role in ROLE_OF.items():
            security = world.security(who)
            for op in scheduler_ops:
                may = allowed(SCHEDULER_HANDLERS, op, role) or (
                    role == "admin" and op not in SCHEDULER_HANDLERS
                )
                if not may:
                    await attempt(role, "portal", world.portal.scheduler, security, op)
            for op in worker_ops:
                if not allowed(WORKER_HANDLERS, op, role):
                    await attempt(role, "worker", world.worker_address, security, op)

    _run(attack())
    assert not let_through, "\n".join(let_through)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "hostile-attempts.txt").write_text("\n".join(attempts) + "\n")
    print("\n".join(attempts))
    assert len(attempts) >= 100, len(attempts)
    # The exact ops Dask uses to run code, reshape the grid or read others' work are among them.
    refused = {line.split()[2] for line in attempts if line.startswith("client")}
    assert {"run_function", "broadcast", "processing", "get_runspec", "retire_workers"} <= refused
    worker_refused = {line.split()[2] for line in attempts if " worker " in line}
    assert {"run", "run_coroutine", "plugin-add", "upload_file", "update_data"} <= worker_refused
    with world.grid("admin") as admin:
        after = admin.client.run_on_scheduler(_portal_state)
    assert after == before


def _portal_state(dask_scheduler: Any) -> dict[str, Any]:
    """What an attack could have changed, read inside the portal by its admin."""
    plugin = dask_scheduler.plugins["grid-portal"]
    return {
        "workers": sorted(str(ws.name) for ws in dask_scheduler.workers.values()),
        "plugins": sorted(dask_scheduler.plugins),
        "jobs": sorted(plugin.jobs.jobs),
        "variables": sorted(getattr(dask_scheduler.extensions.get("variables"), "variables", {})),
    }


def test_a_node_certificate_is_never_a_client(world: World) -> None:
    from distributed import Client

    security = world.security("node")
    with pytest.raises(Exception, match="refused: a node certificate is only ever a worker"):
        Client(world.portal.scheduler, security=security, timeout=10)
    # The raw way: register a client stream, then send a graph and a probe on it. Nothing
    # that reached the portal was unpickled: the marker file never appears.
    marker = world.tmp / "node-probe-marker"

    async def raw() -> Any:
        from distributed.comm import connect

        comm = await connect(world.portal.scheduler, **security.get_connection_args("client"))
        await comm.write({"op": "register-client", "client": "Client-evil", "reply": False})
        reply = await comm.read()
        comm.abort()
        return reply

    reply = _run(raw())
    assert "refused" in str(reply)
    assert not marker.exists()


class Probe:
    """Unpickling this writes a marker file naming the process that unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        code = (
            f"open({self.path!r}, 'a').write(open('/proc/self/cmdline').read()"
            ".replace(chr(0), ' ') + chr(10))"
        )
        return (exec, (code,))


def test_a_probe_sent_with_a_node_certificate_is_never_unpickled(world: World) -> None:
    """Every door a node certificate might push bytes through on the portal: refused before
    anything is read, so the marker is never written."""
    from distributed.protocol import to_serialize

    from grid_portal.errors import NotAllowed

    marker = world.tmp / "probe-marker"
    security = world.security("node")
    ops = {
        "scatter": {"data": {"x": to_serialize(Probe(str(marker)))}},
        "update_data": {"who_data": {"x": [world.worker_address]}, "nbytes": {"x": 1}},
        "variable_set": {"key": "v", "data": to_serialize(Probe(str(marker))), "name": "v"},
        "publish_put": {"keys": [], "name": "d", "data": to_serialize(Probe(str(marker)))},
        "run_function": {"function": to_serialize(Probe(str(marker)))},
    }

    async def attack() -> None:
        for op, args in ops.items():
            with pytest.raises(NotAllowed):
                await _call(world.portal.scheduler, security, op, **args)

    _run(attack())
    assert not marker.exists()


def test_two_researchers_cannot_touch_each_others_work_and_the_teacher_sees_both(
    world: World,
) -> None:
    from grid_portal.errors import NotAllowed

    alice, bob, tess = world.grid("alice"), world.grid("bob"), world.grid("tess")
    try:
        with alice.job("alice's work") as alice_job:
            running = alice.submit(where_and_what, 1, 30.0)
            done = alice.submit(where_and_what, 2)
        with bob.job("bob's work") as bob_job:
            mine = bob.submit(where_and_what, 3)
        assert done.result(timeout=60) == ("honest", 2)
        assert mine.result(timeout=60) == ("honest", 3)
        wait_for(lambda: alice.get_job(alice_job) is not None, what="alice's job recorded")

        # Bob sees, gathers, cancels and reads nothing of Alice's.
        assert bob.get_job(alice_job) is None
        assert alice_job not in [j.id for j in bob.jobs()]
        security = world.security("bob")

        async def bobs_attempts() -> list[str]:
            refused = []
            for op, args in (
                ("gather", {"keys": [done.key]}),
                ("who_has", {"keys": [done.key]}),
                ("processing", {}),
                ("get_task_stream", {}),
                ("events", {}),
                ("get_runspec", {"key": running.key}),
                ("retry", {"keys": [done.key]}),
            ):
                with pytest.raises(NotAllowed):
                    await _call(world.portal.scheduler, security, op, **args)
                refused.append(op)
            return refused

        assert len(_run(bobs_attempts())) == 7
        with pytest.raises(GridError, match="no job"):
            bob.cancel(alice_job)
        assert bob.fetch_result(alice_job) is None
        logs = _run(_call(world.portal.scheduler, security, "grid_job_logs", job_id=alice_job))
        assert logs is None
        # Bob's plain Dask cancel of Alice's key is dropped at the portal: her task runs on.
        _cancel_keys_as(world, "bob", [running.key])
        assert alice.get_job(alice_job).state.value in ("running", "queued")
        assert not running.done()

        # The teacher sees both, and Dask's views of everyone's tasks.
        everyone = {j.id for j in tess.jobs(everyone=True)}
        assert {alice_job, bob_job} <= everyone
        processing = _run(_call(world.portal.scheduler, world.security("tess"), "processing"))
        assert running.key in {k for keys in processing.values() for k in keys}
        # ...but runs no code on the portal.
        with pytest.raises(NotAllowed, match="reserved for the portal's admin"):
            tess.client.run_on_scheduler(lambda: "pwned")
        alice.cancel(alice_job)
    finally:
        alice.close()
        bob.close()
        tess.close()


def _cancel_keys_as(world: World, who: str, keys: list[str]) -> None:
    """Send Dask's own cancel-keys stream message, forced, from ``who``'s client stream."""
    from distributed import Client

    with Client(world.portal.scheduler, security=world.security(who), timeout=20) as client:
        client._send_to_scheduler(
            {"op": "cancel-keys", "keys": keys, "force": True, "reason": "attack", "msg": "x"}
        )
        _flush(client)
    log = world.portal.log
    wait_for(
        lambda: f"refused cancel-keys from client {who!r}" in log.read_text(),
        timeout=10,
        what="the portal to refuse the cancel",
    )


def _flush(client: Any) -> None:
    """Wait until everything the client queued has been sent (its BatchedSend is empty)."""
    wait_for(lambda: not client.scheduler_comm.buffer, timeout=10, what="the stream flushed")


def test_forged_worker_and_client_fields_are_refused(world: World) -> None:
    """Mallory forges the victim's client on update-graph, pushes a result naming the node
    that runs the victim's task, and sends task-erred for it: all refused, the victim's
    kernel receives nothing but its own result."""
    from distributed import Client

    victim = world.grid("alice")
    try:
        with victim.job("victim") as job_id:
            future = victim.submit(where_and_what, 7, 3.0)
        wait_for(lambda: victim.get_job(job_id) is not None, what="the victim's job")
        victim_client = victim.client.id
        with Client(world.portal.scheduler, security=world.security("bob"), timeout=20) as mallory:
            for msg in (
                {"op": PUSH_OP, "key": future.key, "data": b"evil", "worker": world.worker_address},
                {
                    "op": "task-erred",
                    "key": future.key,
                    "worker": world.worker_address,
                    "exception": b"",
                    "traceback": b"",
                    "run_id": 1,
                    "stimulus_id": "x",
                    "exception_text": "forged",
                    "traceback_text": "",
                },
                {"op": "client-releases-keys", "keys": [future.key], "client": victim_client},
            ):
                mallory._send_to_scheduler(msg)
            _flush(mallory)
        assert future.result(timeout=60) == ("honest", 7)

        # An update-graph naming the victim's client: the portal takes the client from the
        # connection, so the task is Bob's, in Bob's job, and only Bob hears of it.
        with world.grid("bob") as bob:
            send = bob.client._send_to_scheduler

            def forging(msg: dict[str, Any]) -> Any:
                if msg.get("op") == "update-graph":
                    msg = {**msg, "client": victim_client}
                return send(msg)

            bob.client._send_to_scheduler = forging
            with bob.job("forged") as forged_job:
                forged = bob.submit(where_and_what, 8)
            assert forged.result(timeout=60) == ("honest", 8)
            with world.grid("admin") as admin:
                wanted_by, owner = admin.client.run_on_scheduler(
                    _who_wants_and_owner, forged.key, forged_job
                )
            assert wanted_by == [bob.client.id]
            assert owner == "bob"
        assert forged.key not in victim.client.futures
    finally:
        victim.close()
    log = world.portal.log.read_text()
    assert f"refused {PUSH_OP} from client 'bob'" in log
    assert "refused task-erred from client 'bob'" in log


def _who_wants_and_owner(key: str, job_id: str, dask_scheduler: Any) -> tuple[list[str], str]:
    ts = dask_scheduler.tasks[key]
    record = dask_scheduler.plugins["grid-portal"].jobs.jobs[job_id]
    return sorted(cs.client_key for cs in ts.who_wants), record.owner


def test_revoked_researcher_is_cut_off_at_once(world: World) -> None:
    from grid_portal.errors import NotAllowed

    conn = researcher_connection(world.portal, world.tmp, "eve")
    eve = Grid(conn, start_embedded=False)
    try:
        assert eve.submit(where_and_what, 1).result(timeout=60) == ("honest", 1)
        out = subprocess.run(
            grid_portal_command("certs", "revoke", "eve", "--data-dir", str(world.portal.data_dir)),
            capture_output=True,
            text=True,
            check=True,
        )
        assert "revoked client 'eve'" in out.stdout
        started = time.monotonic()
        wait_for(
            lambda: not _eve_connected(world), timeout=10, what="eve's connection to be closed"
        )
        assert time.monotonic() - started < 5  # the portal sweeps revocations every second
        # Eve's Grid tries to reconnect and is told why it cannot, in one clear line.
        refusal = wait_for(
            lambda: _refusal_of(lambda: eve.submit(where_and_what, 2)),
            timeout=20,
            what="eve's Grid to be refused",
        )
        assert "refused this certificate" in refusal and "revoked" in refusal
    finally:
        eve.close()
    with pytest.raises(NotAllowed, match="revoked"):
        _run(_call(world.portal.scheduler, Connection.load(Path(conn)).security(), "grid_nodes"))
    listed = subprocess.run(
        grid_portal_command("certs", "list", "--json", "--data-dir", str(world.portal.data_dir)),
        capture_output=True,
        text=True,
        check=True,
    )
    records = {(r["role"], r["name"]): r for r in json.loads(listed.stdout)}
    assert records[("client", "eve")]["revoked"] is True
    assert records[("client", "alice")]["revoked"] is False


def _refusal_of(action: Any) -> str | None:
    """The message of the NotAllowed that ``action`` raises, or None while it does not."""
    from grid_portal.errors import NotAllowed

    try:
        action()
    except NotAllowed as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - the old connection closing; ask again
        return None
    return None


def _eve_connected(world: World) -> bool:
    with world.grid("admin") as admin:
        return admin.client.run_on_scheduler(_has_client_of, "eve")


def _has_client_of(name: str, dask_scheduler: Any) -> bool:
    plugin = dask_scheduler.plugins["grid-portal"]
    return any(owner == ("client", name) for owner in plugin.access.client_owner.values())


def test_token_list_and_revoke(world: World) -> None:
    token = world.portal.token("--note", "for the lab")
    listed = subprocess.run(
        grid_portal_command("token", "list", "--data-dir", str(world.portal.data_dir)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "for the lab" in listed
    assert token.split("_")[1] not in listed  # never the secret
    token_id = next(line.split()[1] for line in listed.splitlines() if "for the lab" in line)
    out = subprocess.run(
        grid_portal_command("token", "revoke", token_id, "--data-dir", str(world.portal.data_dir)),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    bad = subprocess.run(
        grid_portal_command("token", "revoke", "nope", "--data-dir", str(world.portal.data_dir)),
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0
    assert "token list" in bad.stderr and "Traceback" not in bad.stderr


def test_a_researchers_stream_carries_only_client_ops(world: World) -> None:
    """Every stream op a researcher may not send (workers' ops, the grid's push) is dropped
    and logged at the portal, and the researcher's own stream keeps working."""
    _, stream_ops, _ = _dask_handler_names()
    forbidden = [op for op in stream_ops if not allowed(SCHEDULER_STREAM_OPS, op, "client")]
    forbidden.append(PUSH_OP)
    assert {"task-finished", "task-erred", "add-keys", "long-running"} <= set(forbidden)
    with world.grid("alice") as grid:
        client = grid.client
        for op in forbidden:
            client._send_to_scheduler({"op": op, "key": "nothing", "keys": []})
        _flush(client)
        log = world.portal.log
        wait_for(
            lambda: all(f"refused {op} from client 'alice'" in log.read_text() for op in forbidden),
            timeout=10,
            what="every forbidden stream op refused",
        )
        assert grid.submit(where_and_what, 5).result(timeout=60) == ("honest", 5)


def test_a_persons_certificate_is_renewed_by_their_grid_while_allowed(world: World) -> None:
    """A researcher's certificate with less than half its life left is renewed in the
    background by their Grid: same name and role, a fresh key made here, two weeks more; the
    connection file switches to the new pair. Revoked, the same request is refused."""
    from datetime import datetime, timedelta, timezone

    from cryptography import x509

    from grid_portal import renewal
    from grid_portal.errors import NotAllowed
    from grid_portal.portal.ledger import LEDGER_FILE, EnrolmentBook
    from grid_portal.portal.security import CertificateAuthority, write_private
    from grid_portal.protocol import PERSON_CERT_DAYS

    ca = CertificateAuthority.load_or_create(world.portal.data_dir / "ca")
    now = datetime.now(timezone.utc)
    cert, key = ca.issue(
        "rita",
        role="client",
        not_before=now - timedelta(days=10),
        not_after=now + timedelta(days=4),
    )
    folder = world.tmp / "rita"
    folder.mkdir()
    (folder / "client.pem").write_text(cert)
    write_private(folder / "client-key.pem", key)
    serial = x509.load_pem_x509_certificate(cert.encode()).serial_number
    EnrolmentBook(world.portal.data_dir / LEDGER_FILE).record("rita", "client", f"{serial:x}")
    path = folder / "connection.json"
    Connection(
        scheduler=world.portal.scheduler,
        http=world.portal.http,
        ca=str(world.portal.data_dir / "ca" / "ca.pem"),
        cert=str(folder / "client.pem"),
        key=str(folder / "client-key.pem"),
        name="rita",
    ).save(path)
    assert renewal.due(Connection.load(path))

    with Grid(str(path), start_embedded=False) as grid:
        renewed = wait_for(
            lambda: (
                Connection.load(path).cert != str(folder / "client.pem") and Connection.load(path)
            ),
            timeout=30,
            what="the certificate renewed",
        )
        assert grid.whoami() == {"role": "client", "name": "rita"}
    new_cert = x509.load_pem_x509_certificate(Path(renewed.cert).read_bytes())
    left = new_cert.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(days=PERSON_CERT_DAYS - 1) < left <= timedelta(days=PERSON_CERT_DAYS)
    assert not (folder / "client.pem").exists() and not (folder / "client-key.pem").exists()
    assert (Path(renewed.key).stat().st_mode & 0o777) == 0o600
    assert not renewal.due(renewed)
    with Grid(str(path), start_embedded=False) as again:  # the new pair works
        assert again.submit(where_and_what, 9).result(timeout=60) == ("honest", 9)

    EnrolmentBook(world.portal.data_dir / LEDGER_FILE).revoke("rita", "client")

    async def renew_revoked() -> Any:
        from grid_portal.keys import make_key_and_csr

        _, csr = make_key_and_csr("rita")
        return await _call(world.portal.scheduler, renewed.security(), "grid_renew", csr=csr)

    with pytest.raises(NotAllowed, match="revoked"):
        _run(renew_revoked())


def test_a_node_cannot_claim_to_hold_a_result_it_never_fetched(world: World) -> None:
    """A patched volunteer says "add-keys" for Alice's finished result, which it never had:
    the portal drops the claim, so no other node is ever sent to fetch that result from it."""
    from distributed import Worker

    with world.grid("alice") as alice:
        with alice.job("claimed"):
            future = alice.submit(where_and_what, 11)
        assert future.result(timeout=60) == ("honest", 11)

        async def claim() -> tuple[list[str], list[str]]:
            async with Worker(
                world.portal.scheduler,
                security=world.security("node"),
                name="stolen-node",
                nthreads=1,
                dashboard=False,
                host="127.0.0.1",
            ) as patched:
                patched.batched_stream.send(
                    {"op": "add-keys", "keys": [future.key], "stimulus_id": "forged"}
                )
                await patched.batched_stream.comm.write([{"op": "keep-alive"}])  # a flush
                # Wait for the portal to have read the claim: it answers a heartbeat after it.
                await patched.heartbeat()
                return await patched.scheduler.who_has(keys=[future.key]), [patched.address]

        holders, patched_address = _run(claim())
    assert holders, "the result has a holder"
    assert not set(patched_address) & set(holders[future.key]), holders
