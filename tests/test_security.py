"""The portal CA, certificates, identities over real Dask TLS, and join tokens."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dask
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from distributed import Client, Scheduler
from distributed.comm import connect

from grid_portal.errors import EnrolmentRefused, UsageError
from grid_portal.portal.security import (
    CertificateAuthority,
    CertificateRequestRefused,
    Identity,
    ca_pin,
    identity_from_peercert,
    make_key_and_csr,
    peer_identity,
    tls_security,
    write_private,
)
from grid_portal.portal.tokens import TokenStore, parse_token

# ---------------------------------------------------------------------------------------------
# helpers and fixtures


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def subject_of(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    return [a.value for a in cert.subject.get_attributes_for_oid(oid)]


def verifier(ca: CertificateAuthority) -> PolicyBuilder:
    """cryptography's RFC 5280 path validation, trusting only `ca`."""
    return PolicyBuilder().store(Store([ca.cert]))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("portal") / "ca")


@pytest.fixture(scope="module")
def other_ca() -> CertificateAuthority:
    return CertificateAuthority.create("Someone Else's CA")


# ---------------------------------------------------------------------------------------------
# files


def test_write_private_is_0600_in_0700_dirs_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "key.pem"
    write_private(target, "first")
    assert target.read_text() == "first"
    assert mode(target) == 0o600
    assert mode(tmp_path / "a") == 0o700 and mode(tmp_path / "a" / "b") == 0o700

    target.chmod(0o644)  # a replacement gets 0600 again, whatever the old file had
    write_private(target, b"second")
    assert target.read_bytes() == b"second"
    assert mode(target) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["key.pem"]  # no temp file left


def test_ca_files_modes_and_reload(ca: CertificateAuthority) -> None:
    assert ca.directory is not None
    cert_file, key_file = ca.directory / "ca.pem", ca.directory / "ca-key.pem"
    assert mode(cert_file) == 0o644
    assert mode(key_file) == 0o600
    assert mode(ca.directory) == 0o700
    assert cert_file.read_text() == ca.cert_pem

    again = CertificateAuthority.load_or_create(ca.directory)
    assert again.fingerprint() == ca.fingerprint()
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    assert ca.fingerprint() == hashlib.sha256(der).hexdigest()
    assert ca_pin(ca.fingerprint()) == ca.fingerprint()[:32] == ca.pin()


def test_ca_certificate_is_a_ten_year_signing_ca(ca: CertificateAuthority) -> None:
    cert = ca.cert
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3650) <= lifetime <= timedelta(days=3660)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_load_refuses_a_half_or_mismatched_ca(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "one")
    second = CertificateAuthority.load_or_create(tmp_path / "two")
    (tmp_path / "one" / "ca.pem").unlink()
    with pytest.raises(UsageError, match="has ca-key.pem but no ca.pem"):
        CertificateAuthority.load_or_create(tmp_path / "one")

    (tmp_path / "one" / "ca.pem").write_text(second.cert_pem)
    with pytest.raises(UsageError, match="do not belong together"):
        CertificateAuthority.load_or_create(tmp_path / "one")
    assert first.fingerprint() != second.fingerprint()


# ---------------------------------------------------------------------------------------------
# issuing


def test_issued_scheduler_cert_chains_to_the_ca_for_both_directions(
    ca: CertificateAuthority,
) -> None:
    cert_pem, key_pem = ca.issue("portal", "scheduler", hosts=["192.168.1.10", "portal.lab"])
    cert = load(cert_pem)
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert cert.public_key() == key.public_key()
    cert.verify_directly_issued_by(ca.cert)

    # Strict RFC 5280 validation, as a server for each SAN entry and as a client.
    for host in (x509.DNSName("localhost"), x509.DNSName("portal.lab")):
        verifier(ca).build_server_verifier(host).verify(cert, [])
    verifier(ca).build_client_verifier().verify(cert, [])

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "portal.lab", "portal"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "192.168.1.10",
    }
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert subject_of(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["scheduler"]
    assert subject_of(cert, NameOID.COMMON_NAME) == ["portal"]
    assert load(ca.issue("portal", "scheduler")[0]).serial_number != cert.serial_number


def test_issue_names_roles_and_lifetimes(ca: CertificateAuthority) -> None:
    # A name that is no host name stays out of the SAN; a client has no default hosts.
    cert = load(ca.issue("Alice's laptop", "client")[0])
    assert subject_of(cert, NameOID.COMMON_NAME) == ["Alice's laptop"]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    cert = load(ca.issue("lab-pc-3", "node", days=7)[0])
    lifetime = cert.not_valid_after_utc - datetime.now(timezone.utc)
    assert timedelta(days=6.9) < lifetime <= timedelta(days=7)

    with pytest.raises(UsageError, match="unknown certificate role 'root'"):
        ca.issue("x", "root")
    with pytest.raises(UsageError, match="neither an IP address nor a valid DNS name"):
        ca.issue("x", "node", hosts=["bad host!"])
    with pytest.raises(UsageError, match="non-empty name"):
        ca.issue("  ", "node")
    with pytest.raises(UsageError, match="positive number of days"):
        ca.issue("x", "node", days=0)
    past = datetime.now(timezone.utc) - timedelta(days=1)
    with pytest.raises(UsageError, match="before it starts"):
        ca.issue("x", "node", not_before=past, not_after=past - timedelta(hours=1))


def test_sign_csr_uses_our_subject_not_the_requested_one(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "root"),
                ]
            )
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("portal")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert = load(
        ca.sign_csr(greedy.public_bytes(serialization.Encoding.PEM).decode(), "pc-7", "node")
    )
    assert subject_of(cert, NameOID.COMMON_NAME) == ["pc-7"]
    assert subject_of(cert, NameOID.ORGANIZATIONAL_UNIT_NAME) == ["node"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pc-7"]
    assert cert.public_key() == key.public_key()
    verifier(ca).build_client_verifier().verify(cert, [])


def test_volunteer_key_and_csr(ca: CertificateAuthority) -> None:
    key_pem, csr_pem = make_key_and_csr("pc-8")
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    cert = load(ca.sign_csr(csr_pem, "pc-8", "node", days=30))
    assert cert.public_key() == key.public_key()
    assert "PRIVATE" not in csr_pem


def test_tampered_or_garbage_csr_is_refused(ca: CertificateAuthority) -> None:
    _, csr_pem = make_key_and_csr("lab-pc-3")
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    assert der.count(b"lab-pc-3") == 1
    forged = x509.load_der_x509_csr(der.replace(b"lab-pc-3", b"lab-pc-4"))
    forged_pem = forged.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CertificateRequestRefused, match="bad signature") as refused:
        ca.sign_csr(forged_pem, "lab-pc-4", "node")
    assert isinstance(refused.value, EnrolmentRefused) and isinstance(refused.value, UsageError)
    with pytest.raises(CertificateRequestRefused, match="not valid PEM"):
        ca.sign_csr("hello", "x", "node")


# ---------------------------------------------------------------------------------------------
# identities


def test_identity_from_peercert_dict() -> None:
    peercert = {
        "subject": (
            (("organizationName", "Grid Portal"),),
            (("organizationalUnitName", "node"),),
            (("commonName", "pc-7"),),
        ),
        "serialNumber": "1A2B",
    }
    assert identity_from_peercert(peercert) == Identity(role="node", name="pc-7", serial=0x1A2B)
    assert identity_from_peercert({}) is None
    assert identity_from_peercert(None) is None
    no_role = {"subject": ((("commonName", "pc-7"),),), "serialNumber": "01"}
    assert identity_from_peercert(no_role) is None
    unknown = dict(
        peercert, subject=((("organizationalUnitName", "root"),), (("commonName", "x"),))
    )
    assert identity_from_peercert(unknown) is None


# ---------------------------------------------------------------------------------------------
# real Dask TLS


class HandshakeFailures(logging.Handler):
    """Collects the scheduler's "TLS handshake failed" warnings, so a test can tell why a
    connection was refused, and wakes waiters as each arrives."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.arrived = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "TLS handshake failed" in record.getMessage():
            self.messages.append(record.getMessage())
            self.arrived.set()

    async def wait_for(self, reason: str) -> None:
        """Until the scheduler has logged a refusal for `reason` (at most a few seconds)."""
        while not any(reason in m for m in self.messages):
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), timeout=5)


@pytest.fixture
async def scheduler(ca: CertificateAuthority):
    """A real TLS scheduler on loopback whose `whoami` handler records who called it."""
    cert, key = ca.issue("portal", "scheduler")
    failures = HandshakeFailures()
    tcp_logger = logging.getLogger("distributed.comm.tcp")
    tcp_logger.addHandler(failures)
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        async with Scheduler(
            protocol="tls",
            host="127.0.0.1",
            port=0,
            dashboard=False,
            security=tls_security(ca.cert_pem, cert, key),  # PEM text, not paths
        ) as s:
            s.callers = []
            s.cert_serial = load(cert).serial_number
            s.handshake_failures = failures

            def whoami(comm) -> dict[str, str]:
                identity = peer_identity(comm)
                s.callers.append(identity)
                assert identity is not None
                return {"role": identity.role, "name": identity.name, "serial": identity.serial_hex}

            s.handlers["whoami"] = whoami
            try:
                yield s
            finally:
                tcp_logger.removeHandler(failures)


async def test_client_identity_over_real_tls(
    ca: CertificateAuthority, scheduler: Scheduler, tmp_path: Path
) -> None:
    cert_pem, key_pem = ca.issue("alice", "client")
    (tmp_path / "client.pem").write_text(cert_pem)
    write_private(tmp_path / "client-key.pem", key_pem)
    security = tls_security(ca.cert_path, tmp_path / "client.pem", tmp_path / "client-key.pem")
    async with Client(scheduler.address, security=security, asynchronous=True, timeout=5) as c:
        seen = await c.scheduler.whoami()
        # The other direction: Dask does not check the scheduler's host name, the role does.
        assert peer_identity(c.scheduler_comm.comm) == Identity(
            "scheduler", "portal", scheduler.cert_serial
        )
    serial = load(cert_pem).serial_number
    assert seen == {"role": "client", "name": "alice", "serial": f"{serial:x}"}
    assert scheduler.callers == [Identity(role="client", name="alice", serial=serial)]


async def test_plain_tcp_is_refused(scheduler: Scheduler) -> None:
    plain = scheduler.address.replace("tls://", "tcp://")
    with pytest.raises(OSError):
        async with Client(plain, asynchronous=True, timeout=3) as c:
            await c.scheduler.whoami()
    await scheduler.handshake_failures.wait_for("wrong version number")
    assert scheduler.callers == []


async def test_client_without_a_certificate_is_refused(
    ca: CertificateAuthority, scheduler: Scheduler
) -> None:
    # Dask's Security cannot even express "CA but no certificate", so build that TLS context
    # by hand: it trusts the portal but has nothing to show.
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    ctx.check_hostname = False
    with pytest.raises(OSError):
        comm = await connect(scheduler.address, timeout=3, ssl_context=ctx)
        await comm.write({"op": "whoami", "reply": True})
        await comm.read()
    await scheduler.handshake_failures.wait_for("peer did not return a certificate")
    assert scheduler.callers == []


async def test_certificate_from_another_ca_is_refused(
    ca: CertificateAuthority, other_ca: CertificateAuthority, scheduler: Scheduler
) -> None:
    cert, key = other_ca.issue("mallory", "admin")
    security = tls_security(ca.cert_pem, cert, key)  # trusts the portal, shows a foreign cert
    with pytest.raises(OSError):
        async with Client(scheduler.address, security=security, asynchronous=True, timeout=3) as c:
            await c.scheduler.whoami()
    await scheduler.handshake_failures.wait_for("unable to get local issuer certificate")
    assert scheduler.callers == []


async def test_expired_certificate_is_refused(
    ca: CertificateAuthority, scheduler: Scheduler
) -> None:
    now = datetime.now(timezone.utc)
    cert, key = ca.issue(
        "old-laptop",
        "client",
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    security = tls_security(ca.cert_pem, cert, key)
    with pytest.raises(OSError):
        async with Client(scheduler.address, security=security, asynchronous=True, timeout=3) as c:
            await c.scheduler.whoami()
    await scheduler.handshake_failures.wait_for("certificate has expired")
    assert scheduler.callers == []


# ---------------------------------------------------------------------------------------------
# join tokens


@pytest.fixture
def store(tmp_path: Path) -> TokenStore:
    return TokenStore(tmp_path / "ledger.sqlite")


PIN = "0123456789abcdef0123456789abcdef"


def test_token_create_and_redeem(store: TokenStore) -> None:
    created = store.create(ttl=600, uses=2, note="room 12", pin=PIN)
    assert created.text.startswith("gpt_") and created.text.endswith("_" + PIN)
    assert created.text not in repr(created)
    secret, pin = parse_token(created.text)
    assert pin == PIN and len(secret) == 48

    first = store.redeem(created.text)
    assert (first.id, first.uses_total, first.uses_left, first.note) == (
        created.id,
        2,
        1,
        "room 12",
    )
    assert store.redeem("  " + created.text + "\n").uses_left == 0  # pasted with whitespace
    [listed] = store.list()
    assert listed.id == created.id and listed.uses_left == 0 and listed.state() == "used up"


def test_unlimited_token(store: TokenStore) -> None:
    created = store.create(ttl=600, uses=None, pin=PIN)
    for _ in range(3):
        assert store.redeem(created.text).uses_left is None


def test_expired_token_is_refused_with_when(store: TokenStore) -> None:
    start = time.time()
    created = store.create(ttl=60, pin=PIN, now=start)
    when = datetime.fromtimestamp(start + 60, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with pytest.raises(EnrolmentRefused, match=f"expired on {when}, 30.0 s ago"):
        store.redeem(created.text, now=start + 90)
    assert store.list()[0].uses_left == 1  # a refused attempt spends nothing


def test_used_up_token_is_refused(store: TokenStore) -> None:
    created = store.create(pin=PIN)
    store.redeem(created.text)
    with pytest.raises(EnrolmentRefused, match=r"used up \(it allowed 1 enrolment\)"):
        store.redeem(created.text)


def test_wrong_secret_or_pin_is_refused(store: TokenStore) -> None:
    created = store.create(pin=PIN)
    secret, pin = parse_token(created.text)
    wrong_secret = secret[:-1] + ("0" if secret[-1] != "0" else "1")
    for text in (f"gpt_{wrong_secret}_{pin}", f"gpt_{secret}_{'f' * 32}"):
        with pytest.raises(EnrolmentRefused, match="not known to this portal") as refused:
            store.redeem(text)
        assert secret not in str(refused.value) and wrong_secret not in str(refused.value)
    assert store.redeem(created.text).uses_left == 0


def test_malformed_token_text(store: TokenStore) -> None:
    for text in ("", "hello", "gpt_abc_def", "gpt_" + "a" * 48, "xyz_" + "a" * 48 + "_" + PIN):
        with pytest.raises(UsageError, match="not a Grid Portal join token.*token create"):
            parse_token(text)
        with pytest.raises(EnrolmentRefused, match="not a Grid Portal join token"):
            store.redeem(text)


def test_revoked_token_is_refused(store: TokenStore) -> None:
    created = store.create(pin=PIN)
    store.revoke(created.id)
    store.revoke(created.id)  # twice is fine
    with pytest.raises(EnrolmentRefused, match="revoked"):
        store.redeem(created.text)
    assert store.list() == []
    assert [r.state() for r in store.list(include_revoked=True)] == ["revoked"]
    with pytest.raises(UsageError, match="no join token has id 'nope'"):
        store.revoke("nope")


def test_bad_create_arguments(store: TokenStore) -> None:
    with pytest.raises(UsageError, match="positive number of seconds"):
        store.create(ttl=0, pin=PIN)
    with pytest.raises(UsageError, match="at least 1"):
        store.create(uses=0, pin=PIN)
    with pytest.raises(UsageError, match="CA pin"):
        store.create(pin="not-a-pin")


def test_secrets_are_stored_hashed_only(store: TokenStore, tmp_path: Path) -> None:
    created = store.create(note="visible note", pin=PIN)
    secret, _ = parse_token(created.text)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("ledger.sqlite*"))  # db + WAL
    assert b"visible note" in stored  # the check below reads the right bytes
    assert secret.encode() not in stored
    assert created.text.encode() not in stored
    assert hashlib.sha256(secret.encode()).hexdigest().encode() in stored


def test_last_use_goes_to_exactly_one_of_many_racers(store: TokenStore) -> None:
    created = store.create(uses=3, pin=PIN)
    racers = 8
    barrier = threading.Barrier(racers)
    outcomes: list[str] = []

    def race() -> None:
        barrier.wait()
        try:
            store.redeem(created.text)
            outcomes.append("ok")
        except EnrolmentRefused:
            outcomes.append("refused")

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] * 3 + ["refused"] * 5


def test_people_share_one_namespace_so_no_one_enrols_as_the_admin(tmp_path) -> None:
    from grid_portal.portal.ledger import EnrolmentBook

    book = EnrolmentBook(tmp_path / "ledger.sqlite")
    book.record("teacher", "admin", "01")
    assert book.unique_name("teacher", "client") == "teacher-2"  # a researcher can't take it
    assert book.unique_name("teacher", "node") == "teacher"  # machines have their own names
    book.record("teacher-2", "client", "02")
    assert book.unique_name("teacher", "client") == "teacher-3"
