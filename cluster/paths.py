"""Where specshard keeps its files."""

import os
from pathlib import Path


def home() -> Path:
    """`$SPECSHARD_HOME`, default `~/.cache/specshard`."""
    root = Path(os.environ.get("SPECSHARD_HOME", Path.home() / ".cache" / "specshard"))
    root.mkdir(parents=True, exist_ok=True)
    return root
