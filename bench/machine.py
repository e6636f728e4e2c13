"""The machine a benchmark ran on, recorded next to every number."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

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


def report(name: str, result: dict[str, object]) -> None:
    """Add the command and the machine, write bench/results/NAME.json, print it."""
    script = Path(sys.argv[0])
    result = {**result, "command": " ".join(["python", f"bench/{script.name}", *sys.argv[1:]]),
              "machine": machine()}
    text = json.dumps(result, indent=2)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(text + "\n")
    print(text)
