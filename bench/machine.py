"""The machine a benchmark ran on, recorded next to every number."""

from __future__ import annotations

import platform

import llama_cpp

from cluster.hardware import host_info


def machine() -> dict[str, object]:
    host = host_info()
    return {
        "cpu": host.cpu, "cores": host.cpu_count,
        "ram_gib": round(host.ram_total_bytes / 2**30, 1),
        "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
        "gpus": [g.name for g in host.gpus], "gpu_note": host.gpu_error or None,
    }
