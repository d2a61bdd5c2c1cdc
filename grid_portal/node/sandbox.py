"""Where grid work runs on a volunteer's machine, and what it can touch.

The whole Dask worker process runs sandboxed, not only the task functions: the worker unpickles
what researchers send (task definitions, their inputs, results fetched from other nodes), and a
pickle can run code as it is loaded. So the sandbox has to hold the worker itself; the task
processes the worker starts (see ``taskproc``) are inside it too.

Levels, strongest first (``auto`` picks the strongest that works here):

``bubblewrap``
    The worker runs under ``bwrap`` with an allow-list of bound paths, nothing else of the host:
    the system (``/usr``, ``/lib*``, ``/bin``, ``/sbin``), Python (its prefixes, site-packages,
    the grid_portal package) and the few files of ``/etc`` that Python, name lookup and TLS need,
    all read-only; a fresh ``/dev`` (only the lent GPUs), ``/proc``, an empty ``/tmp``, and the
    scratch directory, the only writable host path. No host socket (``/run``, ``/var/run``,
    ``/tmp``), no ``/home``, ``/srv``, ``/opt`` or mounts; not the node's key either (the agent
    hands the worker its certificates in memory). Own process, IPC and host-name namespaces; the
    network is shared (the worker must reach the portal and its peers).
``user``
    No bubblewrap, but the volunteer runs the agent as root: the worker runs as a dedicated
    unprivileged user (``grid-portal`` by default), so file permissions keep it out of private
    files, and it writes only to its scratch directory (and world-writable places like /tmp).
``process``
    Neither: tasks run in their own processes with memory limits and a low CPU priority, which
    protects the machine's responsiveness but not the volunteer's files. The volunteer is told.
``none``
    Plain Dask: tasks run in threads of the worker. For the embedded portal, where the volunteer
    and the researcher are the same person.

Pure and light: no Dask imports; ``bwrap`` is only run to check that it works.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from grid_portal.errors import UsageError

LEVELS = ("bubblewrap", "user", "process", "none")
CHOICES = ("auto", *LEVELS)
DEFAULT_SANDBOX_USER = "grid-portal"

# Places that hold the volunteer's own data. Under bubblewrap nothing of the host is bound but
# the allow-list below; these are never bound even when an import path lies in them (then only
# that path is).
PRIVATE_PLACES = ("/home", "/root", "/media", "/mnt", "/run/media", "/run/user", "/tmp", "/var/tmp")

# The system, bound read-only (or recreated as the symlinks they are, on merged-/usr systems).
SYSTEM_PLACES = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# What Python, name lookup (getaddrinfo, getpwuid) and TLS read from /etc; read-only, if present.
ETC_NEEDED = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/nsswitch.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/pki",
    "/etc/crypto-policies",
    "/etc/alternatives",
    "/etc/mime.types",
)
# The worker's HOME inside the sandbox: an empty, read-only directory, so that nothing a task
# writes (~/.config/dask with a preload, ~/.local/lib/python3.X/site-packages/*.pth) is there
# for the worker, or for a worker started later, to read. Task processes get a HOME of their
# job's own (taskproc.py).
SANDBOX_HOME = "/home/grid-worker"
# Writable places inside the sandbox that all its processes share besides the scratch
# directory: emptied whenever no job runs on the node (taskproc.py), so no job finds what an
# earlier one left there.
SHARED_PLACES = ("/tmp", "/dev/shm")

# Environment variables the worker may see. Everything else (tokens, keys, agent sockets in the
# volunteer's shell environment) stays out of reach of grid tasks.
ENV_ALLOWED = (
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "USER",
    "LOGNAME",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "PYTHONHASHSEED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONWARNINGS",
    "LD_LIBRARY_PATH",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
ENV_ALLOWED_PREFIXES = ("LC_", "DASK_", "CUDA_", "NVIDIA_")

# What Dask's Nanny sets before starting a worker (distributed.nanny.pre-spawn-environ): one
# BLAS/OpenMP thread per task, so N task slots use N cores, not N squared.
PRE_SPAWN_ENV = {
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}

# What bubblewrap needs from the agent's environment: the places to hide, and PYTHONPATH to
# put back.
AGENT_ENV = ("HOME", "XDG_RUNTIME_DIR", "PYTHONPATH")

INSTALL_BUBBLEWRAP = (
    "install bubblewrap (Debian/Ubuntu: sudo apt install bubblewrap; Fedora: sudo dnf install "
    "bubblewrap)"
)


@dataclass(frozen=True)
class SandboxPlan:
    """How this volunteer's worker is started: the level in force and everything it needs."""

    level: str
    scratch: Path  # the one place grid work may write to (the worker's local directory)
    env: Mapping[str, str] = field(default_factory=dict)
    user: tuple[int, int] | None = None  # (uid, gid) to run the worker as, for level "user"
    note: str = ""  # why this level and not a stronger one, for the volunteer
    gpus: tuple[int, ...] = ()  # devices that stay visible under bubblewrap
    readable: tuple[str, ...] = ()  # files the worker must read (its certificate and key)
    bwrap: str | None = None
    agent_env: Mapping[str, str] = field(default_factory=dict)  # HOME etc., to hide them

    def allow_reading(self, *paths: str) -> SandboxPlan:
        """The same plan, with these files readable by the worker (under bubblewrap)."""
        return replace(self, readable=(*self.readable, *paths))

    @property
    def prefix(self) -> tuple[str, ...]:
        """What goes before the worker's command line: bwrap and its options, or nothing."""
        if self.level != "bubblewrap":
            return ()
        return tuple(
            bwrap_command(
                self.scratch,
                gpus=self.gpus,
                readable=self.readable,
                environ=self.agent_env,
                bwrap=self.bwrap,
            )
        )

    @property
    def isolates_tasks(self) -> bool:
        """Tasks run in their own processes (suspendable, memory-limited)."""
        return self.level != "none"

    def describe(self) -> str:
        """One line for the volunteer: what protects their machine."""
        text = {
            "bubblewrap": f"bubblewrap: grid tasks cannot read your home directory and write "
            f"only to {self.scratch}",
            "user": f"a separate user: grid tasks run as an unprivileged user and write only "
            f"to {self.scratch} (and shared places like /tmp)",
            "process": "tasks run in their own processes, with memory limits, but CAN read your "
            f"files; to keep them out, {INSTALL_BUBBLEWRAP}",
            "none": "none: tasks run inside the worker, with your permissions",
        }[self.level]
        return f"{text}{f' ({self.note})' if self.note else ''}"


# -- detection -----------------------------------------------------------------------------------


def bwrap_problem(bwrap: str | None = None) -> str | None:
    """None when bubblewrap works here; else why not, in words. Runs it once (a few ms)."""
    bwrap = bwrap or shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed"
    try:
        result = subprocess.run(
            [
                bwrap,
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--unshare-pid",
                "--die-with-parent",
                "--",
                sys.executable,
                "-S",
                "-c",
                "pass",
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bubblewrap cannot run: {exc}"
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
        # The usual cause: unprivileged user namespaces are off (or restricted by AppArmor).
        return f"bubblewrap does not work here ({detail})"
    return None


def _user_ids(name: str) -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def plan_sandbox(
    requested: str,
    scratch: Path,
    *,
    gpus: Iterable[int] = (),
    readable: Iterable[str] = (),
    sandbox_user: str = DEFAULT_SANDBOX_USER,
    user_scratch: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> SandboxPlan:
    """Choose the level (``auto``: the strongest that works) and prepare its command and env.

    ``readable``: files the worker must read although they may lie in a hidden place (its TLS
    certificate and key). ``user_scratch``: the scratch directory for level ``user``, which must
    be reachable by the sandbox user (the volunteer's own state directory usually is not).
    A level asked for by name that cannot work here is a UsageError that says what to install or
    change; ``auto`` falls back and says why in ``note``.
    """
    if requested not in CHOICES:
        raise UsageError(f"--sandbox {requested!r}: choose one of {', '.join(CHOICES)}")
    environ = os.environ if environ is None else environ
    gpus = tuple(gpus)
    scratch = Path(scratch).expanduser().absolute()
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    notes: list[str] = []

    level = requested
    if requested in ("auto", "bubblewrap"):
        problem = bwrap_problem() if sys.platform.startswith("linux") else "not Linux"
        if problem is None:
            level = "bubblewrap"
        elif requested == "bubblewrap":
            raise UsageError(f"--sandbox bubblewrap: {problem}; {INSTALL_BUBBLEWRAP}")
        else:
            notes.append(problem)
            level = "user" if is_root and _user_ids(sandbox_user) else "process"
    if level == "user":
        if not is_root:
            raise UsageError(
                "--sandbox user: switching to a sandbox user needs the volunteer to run as "
                f"root; use --sandbox bubblewrap ({INSTALL_BUBBLEWRAP}) instead"
            )
        ids = _user_ids(sandbox_user)
        if ids is None:
            raise UsageError(
                f"--sandbox user: there is no user {sandbox_user!r}; create one "
                f"(sudo useradd --system --no-create-home {sandbox_user}) or name another "
                "with --sandbox-user"
            )
        if ids[0] == 0:
            raise UsageError(f"--sandbox-user {sandbox_user!r} is root; name an unprivileged user")
        scratch = Path(user_scratch).absolute() if user_scratch else scratch
        return SandboxPlan(
            level="user",
            scratch=scratch,
            env=worker_env(environ, scratch, gpus),
            user=ids,
            note="; ".join(notes),
        )
    if level == "bubblewrap":
        return SandboxPlan(
            level="bubblewrap",
            scratch=scratch,
            env={**worker_env(environ, scratch, gpus), "HOME": SANDBOX_HOME},
            note="; ".join(notes),
            gpus=tuple(gpus),
            readable=tuple(readable),
            bwrap=shutil.which("bwrap"),
            agent_env={k: environ[k] for k in AGENT_ENV if k in environ},
        )
    if level == "process":
        return SandboxPlan(
            level="process",
            scratch=scratch,
            env=worker_env(environ, scratch, gpus),
            note="; ".join(notes),
        )
    # none: the volunteer's own environment, as a plain `dask worker` would have.
    env = dict(environ)
    env.update(_gpu_env(gpus))
    return SandboxPlan(level="none", scratch=scratch, env=env)


# -- environment ---------------------------------------------------------------------------------


def _gpu_env(gpus: Iterable[int]) -> dict[str, str]:
    # Tasks see only the GPUs the volunteer lends. NVML numbers devices in PCI order; make CUDA
    # use the same order so the indices agree.
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}


def worker_env(environ: Mapping[str, str], scratch: Path, gpus: Iterable[int]) -> dict[str, str]:
    """The sandboxed worker's environment: an allow-list of the volunteer's, plus its own home
    and temporary directory inside the scratch directory."""
    env = {
        k: v
        for k, v in environ.items()
        if k in ENV_ALLOWED or any(k.startswith(p) for p in ENV_ALLOWED_PREFIXES)
    }
    env.update(PRE_SPAWN_ENV)
    env.update(_gpu_env(gpus))
    env["HOME"] = str(scratch / "home")
    env["TMPDIR"] = str(scratch / "tmp")
    env.setdefault("PATH", os.defpath)
    return env


# -- bubblewrap ----------------------------------------------------------------------------------


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _python_paths(environ: Mapping[str, str]) -> list[Path]:
    """What the worker's Python needs to read: the interpreter's prefixes and import paths.

    The current directory is left out on purpose: a volunteer who starts the agent from their
    home directory would otherwise expose all of it. So is any folder that holds the grid_portal
    package (an editable install puts its whole checkout on ``sys.path``): the package folder
    alone is bound.
    """
    cwd = Path.cwd()
    candidates = [
        sys.prefix,
        sys.exec_prefix,
        sys.base_prefix,
        sys.base_exec_prefix,
        os.path.dirname(os.path.realpath(sys.executable)),
        *[p for p in sys.path if p],
        *[p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p],
    ]
    # grid_portal itself: with an editable install its source may sit in a hidden place (a
    # clone under /tmp or the home directory, often the current directory too). Only the
    # package folder is put back, never the rest of that checkout.
    package = Path(__file__).resolve().parents[1]
    paths: list[Path] = [package]
    for text in candidates:
        path = Path(text).absolute()
        if path == cwd or not path.exists() or _is_within(package, path):
            continue
        if path not in paths:
            paths.append(path)
    return paths


def import_path(environ: Mapping[str, str] | None = None) -> list[str]:
    """What an isolated interpreter (``python -I``, which ignores PYTHONPATH) started for grid
    work adds to ``sys.path``: the agent's PYTHONPATH (packages the volunteer installed for the
    grid there) and the folder grid_portal is imported from, when it is not installed."""
    environ = os.environ if environ is None else environ
    entries = [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    entries.append(str(Path(__file__).resolve().parents[2]))
    seen: list[str] = []
    for entry in entries:
        entry = str(Path(entry).absolute())
        if entry not in seen:
            seen.append(entry)
    return seen


def _hidden_places(environ: Mapping[str, str]) -> list[Path]:
    places = [Path(p) for p in PRIVATE_PLACES]
    for extra in (environ.get("HOME"), environ.get("XDG_RUNTIME_DIR"), _home_of_uid()):
        if extra:
            places.append(Path(extra).absolute())
    hidden: list[Path] = []
    for place in sorted(set(places), key=lambda p: len(p.parts)):
        if not place.is_dir() or place == Path("/"):
            continue
        if any(_is_within(place, h) for h in hidden):
            continue  # already under a hidden place
        hidden.append(place)
    return hidden


def _home_of_uid() -> str | None:
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return None


def _gpu_devices(gpus: Iterable[int]) -> list[str]:
    wanted = [f"/dev/nvidia{i}" for i in gpus]
    if wanted:
        wanted += ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
        wanted += ["/dev/nvidia-modeset", "/dev/nvidia-caps"]
    return [d for d in wanted if os.path.exists(d)]


def _system_args() -> list[str]:
    """The system directories: read-only binds, or the symlinks they are (merged /usr)."""
    args: list[str] = []
    for place in SYSTEM_PLACES:
        if os.path.islink(place):
            args += ["--symlink", os.readlink(place), place]
        elif os.path.isdir(place):
            args += ["--ro-bind", place, place]
    for entry in ETC_NEEDED:
        if os.path.lexists(entry):
            args += ["--ro-bind-try", entry, entry]
    return args


def bwrap_command(
    scratch: Path,
    *,
    gpus: Iterable[int] = (),
    readable: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    bwrap: str | None = None,
) -> list[str]:
    """The bwrap command line (ending in ``--``) that the worker's command follows.

    An allow-list: the system, Python and its packages, what /etc must give, all read-only;
    the scratch directory writable; nothing else of the host (see the module docstring).
    ``readable``: more files or folders to bind read-only (never a private place itself).
    """
    environ = os.environ if environ is None else environ
    scratch = Path(scratch).absolute()
    args = [bwrap or shutil.which("bwrap") or "bwrap", *_system_args()]
    args += ["--dev", "/dev", "--proc", "/proc"]
    for device in _gpu_devices(gpus):
        args += ["--dev-bind", device, device]
    args += ["--tmpfs", "/tmp", "--dir", SANDBOX_HOME]
    # Python and its packages, read-only (site-packages too: a .pth file planted there would
    # run in every interpreter started later, -I or not). Never a private place itself or a
    # folder above one, nor above the scratch directory (its siblings hold the node's key).
    hidden = _hidden_places(environ)
    covered = [Path(p) for p in SYSTEM_PLACES]
    needed = [*_python_paths(environ), *(Path(p).absolute() for p in readable)]
    bound: list[Path] = []
    for path in sorted(set(needed), key=lambda p: len(p.parts)):
        if path == Path("/") or any(_is_within(h, path) for h in hidden):
            continue
        if _is_within(scratch, path) or _is_within(path, scratch):
            continue
        if any(_is_within(path, b) for b in (*bound, *covered)):
            continue
        args += ["--ro-bind", str(path), str(path)]
        bound.append(path)
    args += ["--bind", str(scratch), str(scratch), "--chdir", str(scratch)]
    # The sandbox's own root (a tmpfs) read-only, so that nothing can be left there either.
    args += ["--remount-ro", "/"]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    # No controlling terminal (TIOCSTI could type into the volunteer's shell), and no sandbox
    # left behind if the agent dies.
    args += ["--new-session", "--die-with-parent"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Root inside the sandbox could otherwise remount what is read-only.
        args += ["--cap-drop", "ALL"]
    args.append("--")
    return args


def prepare_scratch(plan: SandboxPlan, private_files: Iterable[str] = ()) -> dict[str, str]:
    """Create the scratch directory (emptied of what earlier runs left) for ``plan``.

    Its parts: ``work`` (the worker's Dask directory), ``jobs`` (one directory per job: the
    HOME, TMPDIR and working directory of its tasks, see taskproc.py), ``tmp`` (the worker's
    TMPDIR) and ``home`` (the worker's HOME outside bubblewrap; under level ``user`` it belongs
    to the volunteer, so the sandbox user cannot leave a Dask config there). Nothing of a
    previous run is kept. The node's certificates are not copied here: the agent hands them to
    the worker in memory. ``private_files`` is kept for callers of the old interface: each is
    mapped to itself.
    """
    scratch = plan.scratch
    scratch.mkdir(parents=True, exist_ok=True)
    info = os.lstat(scratch)
    if not stat.S_ISDIR(info.st_mode) or (
        hasattr(os, "geteuid")
        and info.st_uid not in (os.geteuid(), *(plan.user[:1] if plan.user else ()))
    ):
        raise UsageError(
            f"the scratch directory {scratch} is a link or belongs to someone else; remove it "
            "or choose another with --scratch"
        )
    os.chmod(scratch, 0o700)
    for sub in ("work", "jobs", "home", "tmp", "certs"):
        path = scratch / sub
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)  # nothing of a previous run is kept
        if sub != "certs":  # copies of the key that older versions made: gone
            path.mkdir(exist_ok=True)
    mapping = {f: f for f in private_files}
    if plan.level == "user" and plan.user is not None:
        uid, gid = plan.user
        for root, dirs, files in os.walk(scratch):
            for name in [*dirs, *files]:
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
        os.chown(scratch, uid, gid, follow_symlinks=False)
        os.chown(scratch / "home", os.geteuid(), os.getegid(), follow_symlinks=False)
        os.chmod(scratch / "home", 0o755)
    return mapping


__all__ = [
    "CHOICES",
    "DEFAULT_SANDBOX_USER",
    "SANDBOX_HOME",
    "SHARED_PLACES",
    "LEVELS",
    "SandboxPlan",
    "bwrap_command",
    "bwrap_problem",
    "import_path",
    "plan_sandbox",
    "prepare_scratch",
    "worker_env",
]
