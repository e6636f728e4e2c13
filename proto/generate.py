"""Regenerate the Python code for proto/specshard/v1/*.proto into cluster/wire/.

    python proto/generate.py [OUT_DIR]

The generated modules are committed; tests/test_wire.py regenerates into a temporary
folder and fails on any difference.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "specshard" / "v1"
PACKAGE = "cluster.wire"


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out.glob("*_pb2*.py*")):
        # protoc writes `import worker_pb2`; we live inside a package.
        text = re.sub(r"^import (\w+_pb2) as", rf"from {PACKAGE} import \1 as",
                      path.read_text(), flags=re.M)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "cluster" / "wire"
    for path in generate(target):
        print(path)
