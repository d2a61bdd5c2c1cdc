"""The portal's certificate authority, certificates and the identities they carry.

Every connection to the scheduler is mutual TLS with the portal's own CA (see docs/security.md). A
certificate says two things about its holder: a name (subject CN) and a role (subject OU, one
of ``ROLES``). The scheduler side reads them back from a live Dask comm with `peer_identity`.

What Dask's TLS checks, read from distributed 2026.8 (``distributed/security.py``,
``Security._get_tls_context``), and why it shapes this module:

- Both ends use ``verify_mode = CERT_REQUIRED`` with ``tls_ca_file`` as the only trust anchor:
  a peer must present a certificate that chains to our CA, is within its validity period and
  carries the right extended key usage (clientAuth for the connecting side, serverAuth for the
  listening side). Dask uses one certificate for both directions, so every certificate we issue
  has both usages.
- ``check_hostname = False`` ("we expect a dedicated CA for the cluster and people using IP
  addresses"): the address a client dials is NOT matched against the scheduler's SAN. Any
  certificate from our CA could therefore stand in as the scheduler; code that must know it is
  talking to the scheduler checks ``peer_identity(comm).role == "scheduler"`` on its side. The
  SAN entries are still written, for tools that do check hostnames (curl, browsers, the HTTP
  enrolment endpoint).
- ``VERIFY_X509_STRICT`` is switched off by Dask, but our certificates are built to pass it
  anyway (key identifiers, critical basicConstraints, keyUsage on the CA).
- The TLS comm (``distributed/comm/tcp.py``, class ``TLS``) exposes
  ``comm.extra_info["peercert"]``: the dict of ``ssl.SSLSocket.getpeercert()``, and ``cipher``.
- ``tls_ca_file``, the certificates and the keys may each be a file path or the PEM text
  itself: Dask tells them apart by a newline in the string (``cadata=`` for the CA; a
  certificate or key in memory is written to a private ``TemporaryDirectory`` just long enough
  for ``load_cert_chain``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from grid_portal.errors import EnrolmentRefused, UsageError
from grid_portal.identity import (  # noqa: F401 - re-exported for portal code
    Identity,
    identity_from_peercert,
    peer_identity,
)
from grid_portal.keys import (  # noqa: F401 - re-exported for portal code
    PIN_HEX_CHARS,
    _write_atomic,
    file_lock,
    make_key_and_csr,
    make_private_dirs,
    write_private,
)
from grid_portal.portal.lend_quota import PEER_USER_PREFIX
from grid_portal.protocol import ROLES
from grid_portal.tls import tls_security  # noqa: F401 - re-exported for portal code

logger = logging.getLogger(__name__)

ORGANIZATION = "Grid Portal"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
CA_YEARS = 10
# Clocks on volunteers' machines drift; a certificate valid "from now" would be refused by a
# peer a minute behind. Back-date the start a little, as most CAs do.
CLOCK_SKEW = timedelta(minutes=5)
MAX_NAME_LENGTH = 64  # the X.520 upper bound for a commonName
# Pins are a prefix of the CA fingerprint: 128 bits is plenty against a second-preimage and
# keeps join tokens short enough to paste.

# Underscores are not legal in host names (RFC 1123) but Windows machine names often have them;
# Dask does not match host names anyway, so refusing to start over one would help nobody.
_DNS_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*")


class CertificateRequestRefused(EnrolmentRefused, UsageError):
    """A volunteer's certificate signing request was malformed, forged or too weak.

    Both an `EnrolmentRefused` (the enrolment endpoint refuses the volunteer) and a `UsageError`
    (it is bad input, not a bug of ours).
    """


# --------------------------------------------------------------------------------------------
# Files


def _directory_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """Hold an exclusive lock on `directory` so two processes never create two CAs at once.

    Where there is no lock (not POSIX), the key/certificate match check on load still catches
    a torn pair.
    """
    return file_lock(directory / ".ca.lock")


# --------------------------------------------------------------------------------------------
# Names, hosts, times


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise UsageError(f"unknown certificate role {role!r}: use one of {', '.join(ROLES)}")
    return role


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise UsageError("a certificate needs a name: give the machine or user a non-empty name")
    name = name.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"name {name[:20]!r}... is {len(name)} characters long: use at most {MAX_NAME_LENGTH}"
        )
    if not name.isprintable():
        raise UsageError(f"name {name!r} contains control characters: use printable text")
    return name


def _dns_safe(text: str) -> str | None:
    """`text` lower-cased if it is a valid DNS name, else None."""
    lowered = text.strip().rstrip(".").lower()
    return lowered if _DNS_NAME.fullmatch(lowered) else None


def _san_entries(name: str, role: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """The subjectAltName entries: `hosts`, then the name if it is a valid host name."""
    if isinstance(hosts, str):  # a single host passed bare would be split into characters
        hosts = [hosts]
    entries: list[x509.GeneralName] = []

    def add(entry: x509.GeneralName) -> None:
        if entry not in entries:
            entries.append(entry)

    wanted = list(hosts)
    if role == "scheduler":
        wanted += ["127.0.0.1", "localhost"]
    for host in wanted:
        host = str(host).strip()
        try:
            add(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
            continue
        except ValueError:
            pass
        dns = _dns_safe(host)
        if dns is None:
            raise UsageError(
                f"host {host!r} is neither an IP address nor a valid DNS name: "
                "give addresses like 192.168.1.10 or names like portal.lab.example"
            )
        add(x509.DNSName(dns))
    try:
        add(x509.IPAddress(ipaddress.ip_address(name)))
    except ValueError:
        dns = _dns_safe(name)
        if dns is not None:
            add(x509.DNSName(dns))
    return entries


def _utc(when: datetime) -> datetime:
    """Timezone-aware UTC; naive datetimes are taken to be UTC already."""
    return (
        when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    )


def _check_days(days: float) -> float:
    if not isinstance(days, (int, float)) or not math.isfinite(days) or days <= 0:
        raise UsageError(f"certificate lifetime of {days!r} days: give a positive number of days")
    return float(days)


def _subject(name: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate (sub-millisecond, unlike RSA), supported by every TLS stack.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def pem_fingerprint(cert_pem: str | bytes) -> str:
    """SHA-256 of a PEM certificate's DER form, lowercase hex (what `ca_pin` shortens)."""
    if isinstance(cert_pem, str):
        cert_pem = cert_pem.encode("ascii")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise UsageError(f"not a PEM certificate ({e}): give the contents of a .pem file") from e
    return cert.fingerprint(hashes.SHA256()).hex()


def ca_pin(fingerprint: str) -> str:
    """The short form of a CA fingerprint that join tokens carry (first 32 hex characters)."""
    pin = fingerprint.strip().lower().replace(":", "")
    if len(pin) < PIN_HEX_CHARS or not re.fullmatch(r"[0-9a-f]+", pin):
        raise UsageError(
            f"{fingerprint!r} is not a SHA-256 fingerprint: give 64 hex characters, "
            "as `CertificateAuthority.fingerprint()` returns"
        )
    return pin[:PIN_HEX_CHARS]


def check_csr(csr_pem: str | bytes) -> x509.CertificateSigningRequest:
    """The parsed CSR if it is well formed, self-signed correctly and has a strong key.

    Raises `CertificateRequestRefused` otherwise. Callers can check a CSR before spending a
    join token on it; `CertificateAuthority.sign_csr` checks it again.
    """
    if isinstance(csr_pem, str):
        csr_pem = csr_pem.encode("ascii", errors="replace")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CertificateRequestRefused(
            f"the certificate signing request is not valid PEM ({e}): run the volunteer's "
            "enrolment again so that it makes a fresh request"
        ) from e
    try:
        signed = csr.is_signature_valid
    except (ValueError, InvalidSignature, x509.UnsupportedGeneralNameType):
        signed = False
    if not signed:
        raise CertificateRequestRefused(
            "the certificate signing request has a bad signature (it was altered after it "
            "was made): run the volunteer's enrolment again so that it makes a fresh request"
        )
    public = csr.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise CertificateRequestRefused(
                f"the request's RSA key has {public.key_size} bits: use at least 2048 bits "
                "or an EC P-256 key"
            )
    elif not isinstance(public, ec.EllipticCurvePublicKey):
        raise CertificateRequestRefused(
            f"the request's key type ({type(public).__name__}) is not supported: "
            "use an EC P-256 or RSA key"
        )
    return csr


# --------------------------------------------------------------------------------------------
# The CA


class CertificateAuthority:
    """The portal's own CA: issues every certificate that the scheduler will accept.

    Create or load one with `load_or_create`; the key stays in ``ca-key.pem`` (mode 0600).
    """

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        directory: Path | None = None,
    ) -> None:
        self.cert = cert
        self._key = key
        self.directory = directory

    # ---- files

    @property
    def cert_path(self) -> Path | None:
        """``ca.pem``, the file to hand to Dask as ``tls_ca_file``; None for an in-memory CA."""
        return None if self.directory is None else self.directory / CA_CERT_FILE

    @classmethod
    def load_or_create(cls, directory: Path, name: str = "Grid Portal CA") -> CertificateAuthority:
        """Load the CA from `directory`, or create it there (ca.pem 0644, ca-key.pem 0600)."""
        directory = Path(directory)
        make_private_dirs(directory)
        with _directory_lock(directory):
            cert_file, key_file = directory / CA_CERT_FILE, directory / CA_KEY_FILE
            if cert_file.exists() or key_file.exists():
                return cls._load(directory)
            ca = cls.create(name, directory=directory)
            # Key first: a crash between the two writes leaves a key without a certificate,
            # which _load reports, never a certificate whose key is lost.
            write_private(key_file, _key_pem(ca._key))
            _write_atomic(cert_file, ca.cert_pem, 0o644)
            logger.info("created the portal CA in %s (fingerprint %s)", directory, ca.fingerprint())
            return ca

    @classmethod
    def create(
        cls, name: str = "Grid Portal CA", directory: Path | None = None
    ) -> CertificateAuthority:
        """A new CA in memory (nothing written); `load_or_create` is the usual entry point."""
        name = _check_name(name)
        key = _new_key()
        now = datetime.now(timezone.utc)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, name),
            ]
        )
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + timedelta(days=365 * CA_YEARS + CA_YEARS // 4))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, directory)

    @classmethod
    def _load(cls, directory: Path) -> CertificateAuthority:
        cert_file, key_file = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        for present, absent in ((cert_file, key_file), (key_file, cert_file)):
            if present.exists() and not absent.exists():
                raise UsageError(
                    f"the portal CA in {directory} has {present.name} but no {absent.name}: "
                    f"restore {absent.name} from a backup, or move {directory} aside to create "
                    "a new CA (every volunteer must then enrol again)"
                )
        if os.name == "posix" and key_file.stat().st_mode & 0o077:
            logger.warning("%s was readable by other users; setting its mode to 0600", key_file)
            os.chmod(key_file, 0o600)
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        except (ValueError, TypeError) as e:
            raise UsageError(
                f"cannot read the portal CA in {directory} ({e}): restore it from a backup, or "
                "move the directory aside to create a new CA"
            ) from e
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise UsageError(f"{key_file} holds an unsupported key type: use an EC or RSA key")
        if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise UsageError(
                f"{cert_file} and {key_file} do not belong together: restore the matching pair, "
                f"or move {directory} aside to create a new CA"
            )
        if cert.not_valid_after_utc <= datetime.now(timezone.utc):
            raise UsageError(
                f"the portal CA in {directory} expired on {cert.not_valid_after_utc:%Y-%m-%d}: "
                "move the directory aside to create a new CA (every volunteer must enrol again)"
            )
        return cls(cert, key, directory)

    # ---- facts

    @property
    def cert_pem(self) -> str:
        """The CA certificate, PEM: what every peer trusts (``tls_ca_file``)."""
        return _cert_pem(self.cert)

    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate's DER form, lowercase hex."""
        return self.cert.fingerprint(hashes.SHA256()).hex()

    def pin(self) -> str:
        """`ca_pin` of this CA: what join tokens carry."""
        return ca_pin(self.fingerprint())

    # ---- issuing

    def issue(
        self,
        name: str,
        role: str,
        hosts: Sequence[str] = (),
        days: float = 365,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> tuple[str, str]:
        """A certificate for a NEW key: returns ``(cert_pem, key_pem)``.

        For the scheduler's own certificate and for local clients. Volunteers use
        `make_key_and_csr` + `sign_csr` instead, so their key never leaves their machine.
        """
        key = _new_key()
        cert = self._build(
            key.public_key(), name, role, hosts, days, not_before=not_before, not_after=not_after
        )
        return _cert_pem(cert), _key_pem(key)

    def sign_csr(self, csr_pem: str | bytes, name: str, role: str, days: float = 365) -> str:
        """Sign a volunteer's CSR; returns the certificate, PEM.

        Only the CSR's public key is used. The subject is ours (CN=`name`, OU=`role`): whatever
        names, roles or extensions the CSR asked for are ignored, so a volunteer cannot promote
        itself to "admin" or "scheduler" by asking.
        """
        public = check_csr(csr_pem).public_key()
        return _cert_pem(self._build(public, name, role, (), days))

    def _build(
        self,
        public: Any,
        name: str,
        role: str,
        hosts: Sequence[str],
        days: float,
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> x509.Certificate:
        name, role = _check_name(name), _check_role(role)
        if name.startswith(PEER_USER_PREFIX):
            # Fair share counts a borrowing peer portal as the user peer:NAME (lend_quota.py):
            # a person by that name would share its usage and quota.
            raise CertificateRequestRefused(
                f"the name {name!r} starts with {PEER_USER_PREFIX!r}, which this portal keeps "
                "for peer portals in its fair share: use another name"
            )
        now = datetime.now(timezone.utc)
        start = _utc(not_before) if not_before is not None else now - CLOCK_SKEW
        end = _utc(not_after) if not_after is not None else now + timedelta(days=_check_days(days))
        # A certificate cannot outlive the CA that vouches for it: peers would refuse it anyway.
        end = min(end, self.cert.not_valid_after_utc)
        if end <= start:
            raise UsageError(
                f"certificate would end ({end:%Y-%m-%d %H:%M} UTC) before it starts "
                f"({start:%Y-%m-%d %H:%M} UTC): give not_after later than not_before"
            )
        is_rsa = isinstance(public, rsa.RSAPublicKey)
        ca_ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(_subject(name, role))
            .issuer_name(self.cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,  # RSA key exchange in TLS 1.2; EC keys sign only
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                # Dask uses one certificate for both directions of every connection.
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        san = _san_entries(name, role, hosts)
        if san:  # RFC 5280: an empty subjectAltName extension is not allowed
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        logger.info("issued a %s certificate for %r (serial %x)", role, name, cert.serial_number)
        return cert
