"""What this node has: CPU and RAM (psutil), GPUs (pynvml, when a driver is there)."""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    utilization_percent: int
    temperature_c: int
    driver: str


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    pid: int
    cpu: str
    cpu_count: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_error: str = ""  # why there are no GPUs, when there are none


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> tuple[list[GpuInfo], str]:
    """NVIDIA GPUs through NVML; no driver (as on CI) is "no GPUs" with the reason."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError…
        return [], f"NVML unavailable: {exc}"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        found = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found.append(GpuInfo(
                index=i, name=str(pynvml.nvmlDeviceGetName(handle)),
                total_bytes=int(memory.total), free_bytes=int(memory.free),
                utilization_percent=int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                temperature_c=int(pynvml.nvmlDeviceGetTemperature(handle, 0)),
                driver=str(driver)))
        return found, ""
    finally:
        pynvml.nvmlShutdown()


def host_info() -> HostInfo:
    memory = psutil.virtual_memory()
    found, error = gpus()
    return HostInfo(
        hostname=socket.gethostname(), pid=os.getpid(), cpu=_cpu_name(),
        cpu_count=psutil.cpu_count() or 1, ram_total_bytes=memory.total,
        ram_available_bytes=memory.available, gpus=found, gpu_error=error)
