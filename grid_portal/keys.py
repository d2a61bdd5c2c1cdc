"""Key material every side needs: private files, key + CSR generation, the join-token format.

Shared by the portal and the volunteer. It lives outside ``portal/`` because volunteer code
must never import portal code (docs/architecture.md, rules), yet both must agree on these exactly.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from grid_portal.errors import EnrolmentRefused, UsageError

PIN_HEX_CHARS = 32  # a join token carries this much of the portal CA's SHA-256 fingerprint
TOKEN_PREFIX = "gpt_"
_NEW_TOKEN_HINT = "ask the portal's admin for a new one with `grid-portal token create`"
_TOKEN_RE = re.compile(rf"{TOKEN_PREFIX}([0-9a-f]{{32,128}})_([0-9a-f]{{{PIN_HEX_CHARS}}})")


def make_private_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents with mode 0700; leave existing ones alone.

    ``Path.mkdir(parents=True, mode=...)`` applies the mode only to the last directory, so the
    parents are made one by one.
    """
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        if d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made by someone else meanwhile
            os.mkdir(d, 0o700)


def _write_atomic(path: Path, data: bytes | str, mode: int) -> None:
    """Replace `path` with `data` so that readers see the old file or the new one, never half.

    The temporary file is created with `mode` from the start (never a moment world-readable),
    fsync'ed, then renamed over the target; the directory is fsync'ed so the rename survives a
    power cut.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    make_private_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, mode)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 files)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_private(path: Path, data: bytes | str) -> None:
    """Create or replace `path` atomically with mode 0600 (keys, tokens); parents get 0700."""
    _write_atomic(Path(path), data, 0o600)


def keep_credentials(
    folder: Path, stem: str, ca_pem: str, cert_pem: str, key_pem: str
) -> tuple[Path, Path, Path]:
    """Keep what an enrolment gave (the portal's CA, a certificate, its key) in ``folder``,
    made private (0700; the key 0600), as ``ca.pem``, ``STEM.pem`` and ``STEM-key.pem``.
    Returns their paths: CA, certificate, key."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca, cert, key = folder / "ca.pem", folder / f"{stem}.pem", folder / f"{stem}-key.pem"
    ca.write_text(ca_pem)
    cert.write_text(cert_pem)
    write_private(key, key_pem)
    return ca, cert, key


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (made, mode 0600, if missing) in the block, so
    that two processes never make the same key material or start the same portal at once.

    POSIX only (``fcntl``); elsewhere nothing is locked, and each caller says what the worst
    case is then.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class MalformedToken(UsageError, EnrolmentRefused):
    """Text that is not a join token at all (truncated paste, wrong string).

    A `UsageError` (bad input) and an `EnrolmentRefused` (what `TokenStore.redeem` raises).
    """


def parse_token(text: str) -> tuple[str, str]:
    """``"gpt_<secret>_<pin>"`` -> ``(secret, pin)``; `MalformedToken` for anything else."""
    cleaned = text.strip().lower() if isinstance(text, str) else ""
    match = _TOKEN_RE.fullmatch(cleaned)
    if match is None:
        # The message never repeats the text: it may be a real token with a typo in it.
        raise MalformedToken(
            "this is not a Grid Portal join token (they look like gpt_<48 hex>_<32 hex>); "
            + _NEW_TOKEN_HINT
        )
    return match.group(1), match.group(2)


def make_key_and_csr(name: str) -> tuple[str, str]:
    """A new key and a CSR for it: returns ``(key_pem, csr_pem)``.

    Runs on the volunteer's machine; only the CSR is sent to the portal, the key never leaves.
    The CSR's subject is a courtesy: the portal decides the certificate's name and role.
    """
    if not isinstance(name, str) or not name.strip() or not name.isprintable():
        raise UsageError("a certificate needs a name: give the machine a non-empty, printable name")
    name = name.strip()[:63]
    # P-256: fast to generate, supported by every TLS stack.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")
