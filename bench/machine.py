"""What machine a benchmark ran on: every number we publish says so."""

from __future__ import annotations

import os
import platform

import llama_cpp
import psutil


def machine() -> dict[str, object]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
        "gpu": None,
    }
