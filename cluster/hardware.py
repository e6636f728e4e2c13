"""What this node has: CPU and RAM (psutil), GPUs (pynvml, when a driver is there) — the
GPUs this process may use, as CUDA_VISIBLE_DEVICES restricts them."""

from __future__ import annotations

import os
import platform
import re
import socket
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML's (= nvidia-smi's) index on the box, not the process's CUDA ordinal
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


def visible_indices(spec: str | None, uuids: list[str]) -> list[int]:
    """The NVML indices of the GPUs a CUDA_VISIBLE_DEVICES value lets a process use, in
    CUDA's order. `uuids` are NVML's, by NVML index; None (unset) means all of them.

    Entries are indices or UUIDs (`GPU-…`; the first few characters are enough, NVIDIA's
    MPS guide). As CUDA does, the list ends at the first entry that names no GPU
    ("0,2,-1,1" is 0 and 2). Indices are read as NVML's (nvidia-smi's) numbering, which
    CUDA follows under CUDA_DEVICE_ORDER=PCI_BUS_ID — what `specshard worker --gpu` and
    the Ray actors set; CUDA's default order puts the fastest GPU first instead, which
    differs only on a box with two different GPU models.
    """
    if spec is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for entry in (e.strip() for e in spec.split(",")):
        if re.fullmatch(r"\d+", entry) and int(entry) < len(uuids):
            index = int(entry)
        elif entry.startswith("GPU-"):
            matches = [i for i, u in enumerate(uuids) if u.startswith(entry)]
            if len(matches) != 1:
                break
            index = matches[0]
        else:  # -1, an index past the end, "": CUDA sees nothing from here on. A MIG-…
            break  # slice is not a whole GPU: it and what follows are not reported
        if index not in chosen:  # a GPU named twice is still one GPU
            chosen.append(index)
    return chosen


def gpus(visible: str | None) -> tuple[list[GpuInfo], str]:
    """NVIDIA GPUs through NVML, those a CUDA_VISIBLE_DEVICES value of `visible` selects
    (None: all). NVML ignores that variable, so a worker limited to one GPU would
    otherwise report — and be planned on — every GPU of its box. No driver (as on CI) is
    "no GPUs" with the reason."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError…
        return [], f"NVML unavailable: {exc}"
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [str(pynvml.nvmlDeviceGetUUID(h)) for h in handles]
        found = []
        for i in visible_indices(visible, uuids):
            memory = pynvml.nvmlDeviceGetMemoryInfo(handles[i])
            found.append(GpuInfo(
                index=i, name=str(pynvml.nvmlDeviceGetName(handles[i])),
                total_bytes=int(memory.total), free_bytes=int(memory.free),
                utilization_percent=int(pynvml.nvmlDeviceGetUtilizationRates(handles[i]).gpu),
                temperature_c=int(pynvml.nvmlDeviceGetTemperature(handles[i], 0)),
                driver=str(driver)))
        if uuids and not found:
            return [], f"CUDA_VISIBLE_DEVICES={visible!r} selects none of the {len(uuids)} GPU(s)"
        return found, ""
    finally:
        pynvml.nvmlShutdown()


def host_info() -> HostInfo:
    memory = psutil.virtual_memory()
    found, error = gpus(os.environ.get("CUDA_VISIBLE_DEVICES"))
    return HostInfo(
        hostname=socket.gethostname(), pid=os.getpid(), cpu=_cpu_name(),
        cpu_count=psutil.cpu_count() or 1, ram_total_bytes=memory.total,
        ram_available_bytes=memory.available, gpus=found, gpu_error=error)
