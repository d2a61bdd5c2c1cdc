"""Capacity probe of a volunteer machine: what it is (static) and how busy it is (telemetry).

Pure and fast: the probe reads psutil, NVML (``pynvml`` from the nvidia-ml-py package) and
package metadata, and changes nothing. It must not import Dask (``import distributed`` costs
about 0.6 s, and ``grid-portal volunteer --help`` uses this module), nor the scientific packages it
reports on (reading their metadata is enough, importing torch would take seconds).

NVML is optional: a machine without an NVIDIA driver is the common case, not an error, so it
yields no GPUs and no warning. Every NVML entry point takes an ``nvml`` module so that tests can
pass a fake one where no GPU exists. GPU indices are NVML's (as ``nvidia-smi`` prints them).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import platform
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

from grid_portal.errors import UsageError
from grid_portal.model import GpuInfo, GpuTelemetry, StaticCapacity, Telemetry

logger = logging.getLogger(__name__)

# Scientific packages a task may ask for, as requirement expressions name them, each with the
# distribution names that provide it (the first one installed wins). Some are published under
# several names: cupy per CUDA version, tensorflow for CPU only, opencv headless.
PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "pandas": ("pandas",),
    "polars": ("polars",),
    "pyarrow": ("pyarrow",),
    "torch": ("torch",),
    "jax": ("jax",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos"),
    "scikit-learn": ("scikit-learn",),
    "scikit-image": ("scikit-image",),
    "xarray": ("xarray",),
    "netcdf4": ("netcdf4",),
    "h5py": ("h5py",),
    "zarr": ("zarr",),
    "numba": ("numba",),
    "cupy": ("cupy", "cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x"),
    "matplotlib": ("matplotlib",),
    "statsmodels": ("statsmodels",),
    "sympy": ("sympy",),
    "astropy": ("astropy",),
    "networkx": ("networkx",),
    "opencv": ("opencv-python", "opencv-python-headless"),
    "dask": ("dask",),
    "distributed": ("distributed",),
    "cloudpickle": ("cloudpickle",),
    "ffmpeg-python": ("ffmpeg-python",),
}

GPU_SELECTION_HELP = "use --gpus all, none, or a list such as 0,1"
NO_GPU_MESSAGE = "this machine has no GPU that NVML can see; use --gpus none"


# --- GPUs -------------------------------------------------------------------------------------


def _load_nvml(nvml: ModuleType | None) -> ModuleType | None:
    """The given NVML module, else ``pynvml`` if installed; imported lazily to keep import fast."""
    if nvml is not None:
        return nvml
    try:
        import pynvml
    except ImportError:
        logger.debug("nvidia-ml-py is not installed: no GPUs")
        return None
    return pynvml


def _nvml_error(nvml: ModuleType) -> type[Exception]:
    return getattr(nvml, "NVMLError", Exception)


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes for names, UUIDs and versions; newer ones str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _optional(nvml: ModuleType, query: Any, *args: Any) -> Any:
    """One NVML query, or None where this device or driver does not support it."""
    try:
        return query(*args)
    except _nvml_error(nvml) as exc:
        logger.debug("NVML %s failed: %s", getattr(query, "__name__", query), exc)
        return None


def _gpu_info(nvml: ModuleType, index: int, driver: str | None) -> GpuInfo | None:
    handle = _optional(nvml, nvml.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return None  # a device NVML lists but cannot open (lost, or being reset) is not lent
    name = _optional(nvml, nvml.nvmlDeviceGetName, handle)
    memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
    capability = _optional(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
    uuid = _optional(nvml, nvml.nvmlDeviceGetUUID, handle)
    return GpuInfo(
        index=index,
        name=_text(name) if name is not None else f"GPU {index}",
        memory_total=int(memory.total) if memory is not None else 0,
        capability=f"{capability[0]}.{capability[1]}" if capability is not None else None,
        driver=driver,
        uuid=_text(uuid) if uuid is not None else None,
    )


def probe_gpus(nvml: ModuleType | None = None) -> list[GpuInfo]:
    """The NVIDIA GPUs that NVML sees, or [] (silently) where there is no driver or no GPU."""
    nvml = _load_nvml(nvml)
    if nvml is None:
        return []
    error = _nvml_error(nvml)
    try:
        nvml.nvmlInit()
    except error as exc:
        # No driver (NVMLError_LibraryNotFound) is the usual case on a volunteer's laptop.
        logger.debug("NVML unavailable, no GPUs: %s", exc)
        return []
    try:
        driver = _optional(nvml, nvml.nvmlSystemGetDriverVersion)
        driver = _text(driver) if driver is not None else None
        found = (_gpu_info(nvml, i, driver) for i in range(nvml.nvmlDeviceGetCount()))
        return [gpu for gpu in found if gpu is not None]
    except error as exc:
        logger.debug("NVML failed while listing GPUs: %s", exc)
        return []
    finally:
        # NVML counts inits, so this leaves an init made elsewhere (distributed's) in place.
        _optional(nvml, nvml.nvmlShutdown)


def parse_gpu_selection(text: str, available: list[GpuInfo]) -> list[int]:
    """The GPU indices a volunteer lends: ``none``, ``all`` or a list such as ``0,2``."""
    indices = [g.index for g in available]
    choice = text.strip().lower()
    if choice == "none":
        return []
    if choice == "all":
        return indices
    if not indices:
        raise UsageError(f"--gpus {text!r} asks for a GPU, but {NO_GPU_MESSAGE}")

    def fail(problem: str, machine: str = "this machine") -> UsageError:
        have = ", ".join(str(i) for i in indices)
        noun = "GPU" if len(indices) == 1 else "GPUs"
        return UsageError(f"{problem}; {machine} has {noun} {have} ({GPU_SELECTION_HELP})")

    selected: list[int] = []
    for item in choice.split(","):
        item = item.strip()
        if not (item.isascii() and item.isdigit()):
            raise fail(f"--gpus {text!r} is not understood")
        index = int(item)
        if index in selected:
            raise fail(f"GPU {index} is listed twice in --gpus {text!r}")
        if index not in indices:
            raise fail(f"GPU {index} does not exist on this machine", machine="it")
        selected.append(index)
    return selected


# --- static capacity --------------------------------------------------------------------------


def installed_packages() -> dict[str, str]:
    """Versions of the scientific packages installed here, read from metadata (no imports)."""
    found: dict[str, str] = {}
    for name, distributions in PACKAGES.items():
        for dist in distributions:
            try:
                found[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass  # not Linux
    return platform.processor() or "unknown"


def _cpu_freq_mhz() -> float | None:
    # The rated maximum says what the machine is; "current" is the fallback where the maximum is
    # unknown (it reads 0 in many VMs). cpu_freq is None or raises where the OS hides it.
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, RuntimeError):
        return None
    if freq is None:
        return None
    for mhz in (freq.max, freq.current):
        if mhz and mhz > 0:
            return float(mhz)
    return None


def _disk_free(disk_path: str | None) -> int | None:
    try:
        path = Path(disk_path).expanduser() if disk_path else Path.home()
    except RuntimeError:  # no home directory known
        path = Path.cwd()
    # The worker's directory may not exist yet: measure the disk it will be created on.
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return int(psutil.disk_usage(str(path)).free)
    except OSError:
        return None


def probe_static(
    gpus: list[int] | None = None,
    disk_path: str | None = None,
    nvml: ModuleType | None = None,
) -> StaticCapacity:
    """What this machine is. ``gpus`` keeps only those indices (the ones lent to the grid)."""
    found = probe_gpus(nvml)
    if gpus is not None:
        found = [g for g in found if g.index in gpus]
    return StaticCapacity(
        cpu_model=_cpu_model(),
        cores_physical=psutil.cpu_count(logical=False),
        cores_logical=psutil.cpu_count() or 1,
        cpu_freq_mhz=_cpu_freq_mhz(),
        memory_total=int(psutil.virtual_memory().total),
        disk_free=_disk_free(disk_path),
        os=platform.system().lower(),
        os_release=platform.release(),
        arch=platform.machine(),
        python=platform.python_version(),
        gpus=found,
        packages=installed_packages(),
    )


# --- telemetry --------------------------------------------------------------------------------


class TelemetrySampler:
    """Live load of this machine and of the grid's own processes, cheap enough for heartbeats.

    ``grid_cpu_percent`` is in percent of one core, like ``top`` (a busy single thread reads
    100 on any machine); ``cpu_percent`` is of the whole machine (0 to 100). Samples closer than
    ``min_interval`` seconds return the previous one: Dask heartbeats can come every 0.5 s, and a
    volunteer's idle cost must stay under 0.5 % of a core.

    ``gpus``: NVML indices to report; None means every GPU, [] means none (NVML is not loaded).
    ``process``: the grid's process (default: this one); its children count too.
    ``relist_interval``: while no task runs (``running_tasks`` 0), the children are listed again
    only this often (listing reads every process of the machine: about 1 ms on a desktop, most
    of a sample's cost); 0 lists them on every sample.
    """

    def __init__(
        self,
        gpus: list[int] | None = None,
        min_interval: float = 2.0,
        nvml: ModuleType | None = None,
        process: psutil.Process | None = None,
        relist_interval: float = 0.0,
    ) -> None:
        self.min_interval = min_interval
        self.relist_interval = relist_interval
        self._listed: list[psutil.Process] = []
        self._listed_monotonic = -float("inf")
        self._process = process if process is not None else psutil.Process()
        # cpu_percent measures since the previous call on the same Process object: keep them.
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
        self._last: Telemetry | None = None
        self._last_monotonic = 0.0
        self._nvml: ModuleType | None = None
        self._gpu_handles: list[tuple[int, Any]] = []
        if gpus != []:
            self._open_nvml(nvml, gpus)
        psutil.cpu_percent(interval=None)  # the first call only sets the baseline
        self._grid_cpu_percent()

    def _open_nvml(self, nvml: ModuleType | None, gpus: list[int] | None) -> None:
        nvml = _load_nvml(nvml)
        if nvml is None:
            return
        try:
            nvml.nvmlInit()
        except _nvml_error(nvml) as exc:
            logger.debug("NVML unavailable, no GPU telemetry: %s", exc)
            return
        try:
            indices = gpus if gpus is not None else range(nvml.nvmlDeviceGetCount())
            self._gpu_handles = [(i, nvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        except _nvml_error(nvml) as exc:
            logger.debug("NVML failed while opening GPUs, no GPU telemetry: %s", exc)
            _optional(nvml, nvml.nvmlShutdown)
            return
        self._nvml = nvml

    def close(self) -> None:
        """Release NVML (it counts inits; other users of it keep theirs)."""
        if self._nvml is not None:
            _optional(self._nvml, self._nvml.nvmlShutdown)
            self._nvml = None
            self._gpu_handles = []

    def sample(self, running_tasks: int = 0) -> Telemetry:
        """A fresh sample, or the last one (with ``running_tasks`` updated) if it is recent."""
        with self._lock:
            now = time.monotonic()  # immune to wall-clock jumps
            if self._last is not None and now - self._last_monotonic < self.min_interval:
                return dataclasses.replace(self._last, running_tasks=running_tasks)
            memory = psutil.virtual_memory()
            self._last = Telemetry(
                time=time.time(),
                # Since the last call anywhere in this process (psutil keeps one baseline).
                cpu_percent=psutil.cpu_percent(interval=None),
                grid_cpu_percent=self._grid_cpu_percent(relist=running_tasks > 0),
                # total - available is what psutil's percent is based on, on every OS.
                memory_used=int(memory.total - memory.available),
                memory_percent=float(memory.percent),
                running_tasks=running_tasks,
                gpus=self._gpu_telemetry(),
            )
            self._last_monotonic = now
            return self._last

    def _grid_cpu_percent(self, relist: bool = True) -> float:
        now = time.monotonic()
        if relist or now - self._listed_monotonic >= self.relist_interval:
            try:
                self._listed = [self._process, *self._process.children(recursive=True)]
            except psutil.NoSuchProcess:
                self._listed = []
            except psutil.AccessDenied:
                self._listed = [self._process]
            self._listed_monotonic = now
        current = self._listed
        procs: dict[int, psutil.Process] = {}
        total = 0.0
        for proc in current:
            cached = self._procs.get(proc.pid)
            # Process equality includes the start time, so a reused pid gets a fresh object.
            if cached is None or cached != proc:
                cached = proc
            try:
                total += cached.cpu_percent(interval=None)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # ended between listing and reading, or not ours to read
            procs[cached.pid] = cached
        self._procs = procs
        return total

    def _gpu_telemetry(self) -> list[GpuTelemetry]:
        nvml = self._nvml
        if nvml is None:
            return []
        sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        out = []
        for index, handle in self._gpu_handles:
            rates = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = _optional(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
            temperature = _optional(nvml, nvml.nvmlDeviceGetTemperature, handle, sensor)
            out.append(
                GpuTelemetry(
                    index=index,
                    utilization=float(rates.gpu) if rates is not None else None,
                    memory_used=int(memory.used) if memory is not None else None,
                    temperature=float(temperature) if temperature is not None else None,
                )
            )
        return out


__all__ = [
    "PACKAGES",
    "TelemetrySampler",
    "installed_packages",
    "parse_gpu_selection",
    "probe_gpus",
    "probe_static",
]
