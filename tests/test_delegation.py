"""Issue 14 point 2: a job's delegated credential, confined to that job, over real TLS.

A real portal and volunteer; researchers Alice and Bob with their own certificates. Alice's
job ``parent`` runs a long task; a credential of role ``delegate`` for that job (made here with
the portal's CA, as the portal makes one for a running job) connects as a Dask client: what
it submits lands in Alice's job, it gathers that job's results only, may use none of the
grid's own handlers (job lists, cancel), cannot touch Alice's other jobs or Bob's, and stops
working the moment the job is cancelled or ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import researcher_connection, start_portal, start_volunteer, wait_for
from gridtasks import plus_one, slow_square

from grid_portal import Grid
from grid_portal.connection import Connection
from grid_portal.errors import NotAllowed
from grid_portal.payload import opened
from grid_portal.protocol import JOB_ANNOTATION, delegate_name


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("delegation")
    portal = start_portal(tmp)
    start_volunteer(portal, tmp, "node-1", "--cpus", "2", "--memory", "2GB", "--label", "who=one")
    common = ("--cpus", "1", "--memory", "1GB", "--label", "who=two")
    start_volunteer(portal, tmp, "node-2", *common)
    alice = Grid(researcher_connection(portal, tmp, "alice"), start_embedded=False)
    bob = Grid(researcher_connection(portal, tmp, "bob"), start_embedded=False)
    yield portal, tmp, alice, bob
    alice.close()
    bob.close()
    portal.stop()


def delegate_security(portal: Any, tmp: Path, owner: str, job_id: str) -> Any:
    """A delegated credential for ``owner``'s job ``job_id``, as the portal's CA signs one."""
    from grid_portal.portal.security import CertificateAuthority, write_private

    ca = CertificateAuthority.load_or_create(portal.data_dir / "ca")
    cert, key = ca.issue(delegate_name(owner, job_id), role="delegate", days=1)
    (tmp / f"delegate-{job_id}.pem").write_text(cert)
    write_private(tmp / f"delegate-{job_id}-key.pem", key)
    return Connection(
        scheduler=portal.scheduler,
        http=portal.http,
        ca=str(portal.data_dir / "ca" / "ca.pem"),
        cert=str(tmp / f"delegate-{job_id}.pem"),
        key=str(tmp / f"delegate-{job_id}-key.pem"),
        name=delegate_name(owner, job_id),
    ).security()


def connect(portal: Any, security: Any) -> Any:
    from grid_portal.daskclient import GridDaskClient

    return GridDaskClient(portal.scheduler, security=security, set_as_default=False, timeout=20)


def test_a_delegate_works_inside_its_job_only(site: Any) -> None:
    import dask

    portal, tmp, alice, bob = site
    with alice.job("parent", job_id="parent-1") as job_id:
        running = alice.submit(slow_square, 1, 120)
    other = alice.submit(plus_one, 1)  # Alice's other job
    bobs = bob.submit(plus_one, 2)
    assert (other.result(timeout=60), bobs.result(timeout=60)) == (2, 3)
    wait_for(lambda: alice.get_job(job_id).state.value == "running", what="the parent job")

    client = connect(portal, delegate_security(portal, tmp, "alice", job_id))
    try:
        # Its work runs, in Alice's job, whatever job it names.
        first = client.submit(plus_one, 41, key="sub-1")
        with dask.annotate(**{JOB_ANNOTATION: other_job(alice, other.key)}):
            second = client.submit(plus_one, first, key="sub-2")
        assert [opened(v) for v in client.gather([first, second])] == [42, 43]
        tasks = alice.job_tasks(job_id) or {}
        assert alice.get_job(job_id).owner == "alice"
        assert {"sub-1", "sub-2"} <= {t["key"] for t in tasks.get("tasks", [])}, tasks

        # Not Alice's other job, not Bob's, not the grid's own handlers.
        for key in (other.key, bobs.key):
            with pytest.raises(NotAllowed):
                client.sync(client.scheduler.gather, keys=[key])
            with pytest.raises(NotAllowed):
                client.sync(client.scheduler.who_has, keys=[key])
        for op, args in (
            ("grid_jobs", {}),
            ("grid_job_cancel", {"job_id": job_id}),
            ("grid_job_result", {"job_id": job_id}),
            ("grid_nodes", {}),
        ):
            with pytest.raises(NotAllowed):
                client.sync(getattr(client.scheduler, op), **args)
    finally:
        client.close()
    alice.cancel(job_id)  # its task process ends at once, and its slot is free again
    running.cancel()


def other_job(grid: Grid, key: str) -> str:
    """The job id of one of ``grid``'s own keys."""
    for job in grid.jobs():
        tasks = grid.job_tasks(job.id) or {}
        if any(t["key"] == key for t in tasks.get("tasks", [])):
            return job.id
    raise AssertionError(f"no job of {key}")


def test_a_delegate_dies_with_its_job(site: Any) -> None:
    from distributed.core import Status

    portal, tmp, alice, _ = site
    with alice.job("parent", job_id="parent-2") as job_id:
        running = alice.submit(slow_square, 1, 120)
    wait_for(lambda: alice.get_job(job_id).state.value == "running", what="the parent job")
    security = delegate_security(portal, tmp, "alice", job_id)
    client = connect(portal, security)
    try:
        assert opened(client.submit(plus_one, 1, key="before-cancel").result(timeout=60)) == 2
        alice.cancel(job_id)
        # Its live connection is dropped, and it is refused from then on.
        wait_for(lambda: client.status != Status.running, timeout=20, what="the drop")
    finally:
        client.close()
    with pytest.raises(ImportError, match="works only while its job runs"):
        connect(portal, security).close()  # Dask raises the refusal of its connection so
    running.cancel()

    # A credential for a job that is over (finished) is refused too.
    with alice.job("short", job_id="short-1") as finished:
        done = alice.submit(plus_one, 5)
    assert done.result(timeout=60) == 6
    wait_for(lambda: alice.get_job(finished).state.value == "done", what="the job to end")
    with pytest.raises(ImportError, match="works only while its job runs"):
        connect(portal, delegate_security(portal, tmp, "alice", finished)).close()
    # And one naming a job that is someone else's, or none.
    for owner, job in (("bob", job_id), ("alice", "no-such-job")):
        with pytest.raises(ImportError, match="works only while its job runs"):
            connect(portal, delegate_security(portal, tmp, owner, job)).close()


def node_security(portal: Any, tmp: Path, name: str) -> Any:
    """A volunteer's own certificate and key, as its state directory holds them."""
    [cert] = (tmp / f"state-{name}").rglob("node.pem")
    return Connection(
        scheduler=portal.scheduler,
        http=portal.http,
        ca=str(portal.data_dir / "ca" / "ca.pem"),
        cert=str(cert),
        key=str(cert.with_name("node-key.pem")),
        name=name,
    ).security()


async def ask_for_delegation(portal: Any, security: Any, key: str, csr: str) -> Any:
    """``grid_delegate`` over a fresh mutual-TLS connection, as a node's worker asks."""
    from distributed.comm import connect as dask_connect
    from distributed.core import send_recv

    comm = await dask_connect(portal.scheduler, **security.get_connection_args("worker"))
    try:
        return await send_recv(comm, op="grid_delegate", key=key, csr=csr)
    finally:
        await comm.close()


def test_only_the_node_running_a_task_gets_its_jobs_credential(site: Any) -> None:
    import asyncio

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    from grid_portal.keys import make_key_and_csr, write_private

    portal, tmp, alice, _ = site
    with alice.job("parent", job_id="parent-3") as job_id:
        running = alice.submit(slow_square, 1, 120, where='labels.who == "two"')
    wait_for(lambda: alice.get_job(job_id).state.value == "running", what="the parent job")
    key_pem, csr = make_key_and_csr("task")

    # Not the node that runs it, not a person, not a task that is not running.
    for who in (node_security(portal, tmp, "node-1"), alice_security(portal, tmp)):
        with pytest.raises(NotAllowed):
            asyncio.run(ask_for_delegation(portal, who, running.key, csr))
    node_2 = node_security(portal, tmp, "node-2")
    with pytest.raises(NotAllowed, match="not running on this node"):
        asyncio.run(ask_for_delegation(portal, node_2, "no-such-task", csr))

    # The node that runs it: a short-lived credential for Alice's job, signed by the portal.
    cert_pem = wait_for(
        lambda: asyncio.run(ask_for_delegation(portal, node_2, running.key, csr))["cert"],
        what="the task to be running on node-2",
    )
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.COMMON_NAME] == f"alice/job/{job_id}"
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "delegate"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() <= 3600 + 600
    (tmp / "issued.pem").write_text(cert_pem)
    write_private(tmp / "issued-key.pem", key_pem)
    security = Connection(
        scheduler=portal.scheduler,
        http=portal.http,
        ca=str(portal.data_dir / "ca" / "ca.pem"),
        cert=str(tmp / "issued.pem"),
        key=str(tmp / "issued-key.pem"),
        name=f"alice/job/{job_id}",
    ).security()
    client = connect(portal, security)
    try:
        assert opened(client.submit(plus_one, 9, key="issued-1").result(timeout=60)) == 10
    finally:
        client.close()
    alice.cancel(job_id)
    running.cancel()
    with pytest.raises(NotAllowed):
        asyncio.run(ask_for_delegation(portal, node_2, running.key, csr))


def alice_security(portal: Any, tmp: Path) -> Any:
    return Connection.load(tmp / "alice.json").security()


def test_an_evolving_workflow_runs_on_the_grid_as_on_a_local_cluster(site: Any) -> None:
    """Dask's tutorial pattern: tasks call get_client(), submit sub-tasks, secede while they
    gather, rejoin. Through Grid and through Client(GridCluster()), the same as a LocalCluster,
    every task in one job of the researcher's."""
    from distributed import Client, LocalCluster
    from gridtasks import fib_evolving

    from grid_portal.cluster import GridCluster

    portal, tmp, alice, _ = site
    local = LocalCluster(n_workers=1, threads_per_worker=2, processes=False)
    with local, Client(local, set_as_default=False) as client:
        expected = client.submit(fib_evolving, 5).result(timeout=60)
    assert expected == 5

    with alice.job("evolving", job_id="evolving-1") as job_id:
        top = alice.submit(fib_evolving, 5, where='labels.who == "one"')
    assert top.result(timeout=120) == expected
    tasks = (alice.job_tasks(job_id) or {}).get("tasks", [])
    assert len(tasks) > 1 and alice.get_job(job_id).owner == "alice", tasks

    connection = str(tmp / "alice.json")
    with GridCluster(connection, start_embedded=False) as cluster, Client(cluster) as client:
        assert client.submit(fib_evolving, 5).result(timeout=120) == expected


def test_another_job_on_the_node_cannot_read_a_tasks_credential(site: Any) -> None:
    """Two jobs on one node share the sandbox's user: a task of one looks through every
    process's memory files for the other's delegated key, and finds none it can read."""
    from gridtasks import hold_own_client, read_task_credentials

    _, _, alice, bob = site
    with alice.job("holder", job_id="holder-1") as job_id:
        holder = alice.submit(hold_own_client, 40, where='labels.who == "one"')
    wait_for(lambda: (alice.get_job(job_id).tasks_done or 0) >= 1, timeout=60, what="its sub-task")
    found = bob.submit(read_task_credentials, where='labels.who == "one"').result(timeout=60)
    assert not [k for k in found if "PRIVATE KEY" in k], "a task read another job's key"
    alice.cancel(job_id)
    holder.cancel()
