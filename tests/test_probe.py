"""Capacity probe: static capacity, GPU discovery and selection, live telemetry.

GPUs are faked only where hardware is absent: a fake NVML module stands in for the driver;
the real one is also exercised (empty here, listed on a machine with a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from grid_portal.errors import UsageError
from grid_portal.model import GpuInfo
from grid_portal.node.probe import (
    TelemetrySampler,
    installed_packages,
    parse_gpu_selection,
    probe_gpus,
    probe_static,
)


def _real_gpu() -> bool:
    """Whether the real NVML sees a GPU here (read directly, not through the probe)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    finally:
        pynvml.nvmlShutdown()


HAS_GPU = _real_gpu()
REPO = Path(__file__).resolve().parents[1]


# --- a fake NVML driver with two GPUs ------------------------------------------------------------

FAKE_DEVICES = [
    # Older nvidia-ml-py returns bytes for names and UUIDs: the first device does.
    {"name": b"NVIDIA A100-SXM4-40GB", "total": 40_000_000_000, "cc": (8, 0), "uuid": b"GPU-aaa"},
    {"name": "NVIDIA GeForce RTX 3060", "total": 12_000_000_000, "cc": (8, 6), "uuid": "GPU-bbb"},
]


def make_fake_nvml(init_fails: bool = False, unsupported: tuple[str, ...] = ()) -> types.ModuleType:
    """A module with the pynvml functions the probe calls; ``calls`` counts each of them."""
    devices = FAKE_DEVICES
    nvml = types.ModuleType("fake_pynvml")
    nvml.calls = {}

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    def api(fn):
        def wrapper(*args):
            nvml.calls[fn.__name__] = nvml.calls.get(fn.__name__, 0) + 1
            if fn.__name__ in unsupported:
                raise NVMLError("Not Supported")
            return fn(*args)

        wrapper.__name__ = fn.__name__
        setattr(nvml, fn.__name__, wrapper)
        return wrapper

    @api
    def nvmlInit():
        if init_fails:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    @api
    def nvmlShutdown():
        pass

    @api
    def nvmlSystemGetDriverVersion():
        return "550.54.15"

    @api
    def nvmlDeviceGetCount():
        return len(devices)

    @api
    def nvmlDeviceGetHandleByIndex(i):
        if not 0 <= i < len(devices):
            raise NVMLError("Invalid Argument")
        return ("handle", i)

    @api
    def nvmlDeviceGetName(h):
        return devices[h[1]]["name"]

    @api
    def nvmlDeviceGetUUID(h):
        return devices[h[1]]["uuid"]

    @api
    def nvmlDeviceGetMemoryInfo(h):
        total = devices[h[1]]["total"]
        return SimpleNamespace(total=total, used=total // 4, free=total - total // 4)

    @api
    def nvmlDeviceGetCudaComputeCapability(h):
        return devices[h[1]]["cc"]

    @api
    def nvmlDeviceGetUtilizationRates(h):
        return SimpleNamespace(gpu=30 + 10 * h[1], memory=5)

    @api
    def nvmlDeviceGetTemperature(h, sensor):
        return 60

    nvml.NVMLError = NVMLError
    nvml.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    nvml.NVML_TEMPERATURE_GPU = 0
    return nvml


@pytest.fixture
def no_warnings(caplog):
    """Fails the test if the code under it warns or logs at WARNING or above."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]


# --- static capacity ------------------------------------------------------------------------------


def test_probe_static_on_this_machine():
    cap = probe_static()
    assert cap.cores_logical == psutil.cpu_count()
    assert cap.cores_physical is None or 1 <= cap.cores_physical <= cap.cores_logical
    assert cap.memory_total == psutil.virtual_memory().total > 0
    assert cap.disk_free is not None and cap.disk_free > 0
    assert cap.os == platform.system().lower() == "linux"
    assert cap.arch == platform.machine()
    assert cap.python == platform.python_version()
    assert cap.python.startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    assert cap.cpu_model and cap.cpu_model != "unknown"
    assert cap.cpu_freq_mhz is None or cap.cpu_freq_mhz > 0
    # psutil and pytest are installed here, but only the scientific list is reported.
    assert cap.packages["distributed"] == __import__("distributed").__version__
    assert "pytest" not in cap.packages
    assert cap.network.bandwidth is None  # measured elsewhere, against the portal


def test_probe_static_filters_gpus_and_measures_a_future_directory(tmp_path):
    cap = probe_static(
        gpus=[1], disk_path=str(tmp_path / "not" / "made" / "yet"), nvml=make_fake_nvml()
    )
    assert [g.index for g in cap.gpus] == [1]
    # The nearest existing parent's disk, give or take what others wrote meanwhile.
    assert abs(cap.disk_free - psutil.disk_usage(str(tmp_path)).free) < 1 << 30
    assert not (tmp_path / "not").exists()  # the probe creates nothing


def test_installed_packages_reads_metadata_without_importing():
    # A fresh interpreter: the probe must not import Dask, nor the packages it reports on.
    code = (
        "import sys; from grid_portal.node.probe import installed_packages;"
        "pk = installed_packages();"
        "print(sorted(m for m in ('dask', 'distributed', 'numpy', 'pynvml') if m in sys.modules));"
        "print(pk.get('numpy'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split("\n")
    assert out[0] == "[]"
    numpy_version = installed_packages().get("numpy")
    assert out[1] == str(numpy_version)


# --- GPUs -----------------------------------------------------------------------------------------


def test_probe_gpus_through_fake_nvml(no_warnings):
    nvml = make_fake_nvml()
    gpus = probe_gpus(nvml)
    assert gpus == [
        GpuInfo(0, "NVIDIA A100-SXM4-40GB", 40_000_000_000, "8.0", "550.54.15", "GPU-aaa"),
        GpuInfo(1, "NVIDIA GeForce RTX 3060", 12_000_000_000, "8.6", "550.54.15", "GPU-bbb"),
    ]
    assert nvml.calls["nvmlShutdown"] == nvml.calls["nvmlInit"] == 1


def test_probe_gpus_keeps_a_device_whose_capability_is_unsupported(no_warnings):
    gpus = probe_gpus(make_fake_nvml(unsupported=("nvmlDeviceGetCudaComputeCapability",)))
    assert [(g.name, g.capability, g.memory_total) for g in gpus] == [
        ("NVIDIA A100-SXM4-40GB", None, 40_000_000_000),
        ("NVIDIA GeForce RTX 3060", None, 12_000_000_000),
    ]


def test_probe_gpus_without_driver_is_empty_and_quiet(no_warnings):
    assert probe_gpus(make_fake_nvml(init_fails=True)) == []


@pytest.mark.skipif(HAS_GPU, reason="this machine has an NVIDIA GPU; see the real-GPU test")
def test_probe_gpus_real_nvml_without_gpu_is_empty_and_quiet(no_warnings):
    assert probe_gpus() == []


@pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU visible to NVML on this machine")
def test_probe_gpus_real_nvml_lists_devices(no_warnings):
    import pynvml

    gpus = probe_gpus()
    pynvml.nvmlInit()
    try:
        assert len(gpus) == pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    for i, gpu in enumerate(gpus):
        assert gpu.index == i
        assert gpu.name and gpu.memory_total > 0
        major, minor = gpu.capability.split(".")
        assert major.isdigit() and minor.isdigit()
        assert gpu.driver and gpu.uuid.startswith(("GPU-", "MIG-"))


# --- GPU selection --------------------------------------------------------------------------------

TWO = probe_gpus(make_fake_nvml())
THREE = [*TWO, GpuInfo(2, "NVIDIA GeForce RTX 3060", 12_000_000_000)]


def test_parse_gpu_selection_words_and_lists():
    assert parse_gpu_selection("none", TWO) == []
    assert parse_gpu_selection(" All ", TWO) == [0, 1]
    assert parse_gpu_selection("all", []) == []
    assert parse_gpu_selection("none", []) == []
    assert parse_gpu_selection("0,2", THREE) == [0, 2]
    assert parse_gpu_selection(" 1 , 0 ", TWO) == [1, 0]


def test_parse_gpu_selection_unknown_index_names_what_exists():
    with pytest.raises(UsageError) as err:
        parse_gpu_selection("0,3", TWO)
    assert str(err.value) == (
        "GPU 3 does not exist on this machine; it has GPUs 0, 1 "
        "(use --gpus all, none, or a list such as 0,1)"
    )


@pytest.mark.parametrize("text", ["", "abc", "0;1", "-1", "0,", "1.0", "gpu0", "all,0", "٣"])
def test_parse_gpu_selection_garbage(text):
    with pytest.raises(UsageError, match=r"is not understood; this machine has GPUs 0, 1 \(use"):
        parse_gpu_selection(text, TWO)


def test_parse_gpu_selection_duplicate():
    with pytest.raises(UsageError, match=r"GPU 1 is listed twice .*has GPUs 0, 1 \(use --gpus"):
        parse_gpu_selection("1,0,1", TWO)


def test_parse_gpu_selection_without_gpus():
    with pytest.raises(UsageError) as err:
        parse_gpu_selection("0", [])
    assert str(err.value).endswith("this machine has no GPU that NVML can see; use --gpus none")


# --- telemetry ------------------------------------------------------------------------------------


def test_telemetry_sample_with_fake_gpus(no_warnings):
    sampler = TelemetrySampler(gpus=[1], min_interval=0, nvml=make_fake_nvml())
    t = sampler.sample(running_tasks=3)
    assert abs(t.time - time.time()) < 5
    assert 0 <= t.cpu_percent <= 100
    assert t.grid_cpu_percent >= 0
    assert 0 < t.memory_used <= psutil.virtual_memory().total
    assert 0 < t.memory_percent <= 100
    assert t.running_tasks == 3
    assert [(g.index, g.utilization, g.memory_used, g.temperature) for g in t.gpus] == [
        (1, 40.0, 3_000_000_000, 60.0)
    ]
    sampler.close()


def test_telemetry_all_gpus_none_and_broken_driver(no_warnings):
    assert [g.index for g in TelemetrySampler(nvml=make_fake_nvml()).sample().gpus] == [0, 1]
    nvml = make_fake_nvml()
    assert TelemetrySampler(gpus=[], nvml=nvml).sample().gpus == []
    assert "nvmlInit" not in nvml.calls  # lending no GPU costs no NVML
    assert TelemetrySampler(nvml=make_fake_nvml(init_fails=True)).sample().gpus == []
    # A selected index that NVML cannot open: no GPU telemetry, no crash.
    assert TelemetrySampler(gpus=[5], nvml=make_fake_nvml()).sample().gpus == []


def test_telemetry_is_cached_within_min_interval():
    nvml = make_fake_nvml()
    sampler = TelemetrySampler(gpus=[0], min_interval=60, nvml=nvml)
    first = sampler.sample(running_tasks=1)
    second = sampler.sample(running_tasks=2)
    assert second.time == first.time
    assert (first.running_tasks, second.running_tasks) == (1, 2)
    assert nvml.calls["nvmlDeviceGetUtilizationRates"] == 1  # the second call read nothing

    uncached = TelemetrySampler(gpus=[0], min_interval=0, nvml=nvml)
    uncached.sample()
    uncached.sample()
    assert nvml.calls["nvmlDeviceGetUtilizationRates"] == 3


def _start(code: str) -> subprocess.Popen:
    # Its own session, so that the whole tree can be killed at once.
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_grid_cpu_counts_a_busy_child_of_the_sampled_process():
    # The sampled process sleeps; its child burns a core. Only counting children sees it.
    parent = _start(
        "import subprocess, sys; subprocess.run([sys.executable, '-c', 'while True: pass'])"
    )
    try:
        sampler = TelemetrySampler(gpus=[], min_interval=0, process=psutil.Process(parent.pid))
        deadline = time.monotonic() + 15
        seen: list[float] = []
        while time.monotonic() < deadline:
            time.sleep(0.2)  # a measuring window for cpu_percent, not a synchronisation
            seen.append(sampler.sample().grid_cpu_percent)
            if seen[-1] > 50:
                break
        assert seen and seen[-1] > 50, seen
    finally:
        _kill_tree(parent)


def test_grid_cpu_of_an_ended_process_is_zero():
    proc = _start("pass")
    sampled = psutil.Process(proc.pid)
    sampler = TelemetrySampler(gpus=[], min_interval=0, process=sampled)
    proc.wait(timeout=10)
    assert sampler.sample().grid_cpu_percent == 0.0
