"""Two booted Debian machines on this one, for `make deploy-test`.

systemd-nspawn boots Debian bookworm root filesystems with systemd as init, each box on
its own core (`taskset`), with its own address on a private bridge that only these boxes
and this host share; links limited to 1 Gbit/s (`tc ... tbf`). The host reaches them
over SSH, as Ansible does. The boxes have no internet: apt goes through apt-cacher-ng on
the bridge, pip installs from the wheelhouse the playbook pushes.

Found by trying on a machine without a system bus and with /run not a tmpfs:
`--register=no --keep-unit` (nspawn would ask machined otherwise), a tmpfs on
/run/systemd/nspawn, a reboot inside makes nspawn exit 133 (it is started again, as
systemd-nspawn@.service does), and no machinectl: `nsenter -t <box's pid 1>`.

Cached between runs under ~/.cache/specshard/deploy-test (SPECSHARD_DEPLOY_CACHE): the
debootstrapped root filesystem, apt-cacher-ng's cache, the SSH key.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

CACHE = Path(os.environ.get("SPECSHARD_DEPLOY_CACHE",
                            Path.home() / ".cache" / "specshard" / "deploy-test"))
MIRROR = os.environ.get("SPECSHARD_DEPLOY_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
PACKAGES = ("systemd,systemd-sysv,dbus,libpam-systemd,openssh-server,python3,python3-venv,"
            "python3-apt,sudo,iproute2,ufw,iptables,procps,netbase")
BRIDGE = "ssdt-br0"
NET = "10.213.77"  # a private /24 that exists only on BRIDGE
HOST_IP = f"{NET}.1"
PROXY_PORT = 3142
RATE = "1gbit"
NSPAWN_RUN = Path("/run/systemd/nspawn")


def sh(*argv: str, timeout: float = 120, check: bool = True, **kw: object
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check,
                          **kw)  # type: ignore[call-overload, no-any-return]


def need_tools() -> list[str]:
    """What this host lacks to boot the boxes (empty: nothing)."""
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "apt-cacher-ng", "nsenter",
                                 "taskset", "tc", "ip", "ssh", "ssh-keygen")
               if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


# --- cached pieces ---------------------------------------------------------------------------


def rootfs(log: list[str]) -> Path:
    """The base root filesystem: debootstrapped once (~1-2 min, ~330 MB), then reused."""
    base = CACHE / f"rootfs-{SUITE}"
    recipe = f"{SUITE} {MIRROR} {PACKAGES} {HOST_IP}:{PROXY_PORT}\n"
    done = base / ".specshard-complete"
    if done.exists() and done.read_text() == recipe:
        return base
    work = CACHE / f"rootfs-{SUITE}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sh("debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(work), MIRROR,
       timeout=1200)
    # Static addresses from systemd-networkd (each box writes its own .network file).
    sh("systemctl", f"--root={work}", "enable", "systemd-networkd", timeout=60)
    sh("systemctl", f"--root={work}", "mask", "systemd-networkd-wait-online.service",
       timeout=60)
    (work / "etc/apt/apt.conf.d/01proxy").write_text(
        f'Acquire::http::Proxy "http://{HOST_IP}:{PROXY_PORT}";\n')
    (work / "etc/ssh/sshd_config.d/specshard.conf").write_text(
        "PermitRootLogin prohibit-password\nUseDNS no\n")
    (work / ".specshard-complete").write_text(recipe)
    if base.exists():
        shutil.rmtree(base)
    work.rename(base)
    log.append(f"root filesystem debootstrapped in {time.monotonic() - t0:.0f} s")
    return base


def ssh_key() -> Path:
    key = CACHE / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "specshard-deploy-test",
           "-f", str(key))
    return key


# --- the bridge and the apt proxy ---------------------------------------------------------


@contextlib.contextmanager
def bridge() -> Iterator[str]:
    """The boxes' private bridge, with the host at HOST_IP; removed afterwards."""
    sh("ip", "link", "del", BRIDGE, check=False)  # left over from a killed run
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    try:
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        yield BRIDGE
    finally:
        sh("ip", "link", "del", BRIDGE, check=False)


@contextlib.contextmanager
def apt_proxy(workdir: Path) -> Iterator[str]:
    """apt-cacher-ng on the bridge address, its cache kept between runs."""
    cache = CACHE / "apt-cacher-ng"
    cache.mkdir(parents=True, exist_ok=True)
    logs = workdir / "apt-cacher-ng"
    logs.mkdir(parents=True, exist_ok=True)
    # Its own configuration, without Debian's mirror remapping (whose backend list is
    # empty here, which fails every request): a plain caching proxy that fetches from
    # the mirror the boxes name, as this host resolves it.
    (logs / "acng.conf").write_text(
        f"CacheDir: {cache}\nLogDir: {logs}\nPort: {PROXY_PORT}\nBindAddress: {HOST_IP}\n"
        f"PidFile: {logs}/pid\nSocketPath: {logs}/socket\nForeGround: 1\n")
    proc = subprocess.Popen(
        ["apt-cacher-ng", "-c", str(logs)],
        stdout=(logs / "out.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not _listening(HOST_IP, PROXY_PORT):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("apt-cacher-ng did not start: "
                                   + (logs / "out.log").read_text()[-2000:])
            time.sleep(0.2)
        yield f"http://{HOST_IP}:{PROXY_PORT}"
    finally:
        _stop(proc, 10)


def _listening(host: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _ns_pid(pid: int) -> int | None:
    """`pid`'s number in its own pid namespace (1: a box's init)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        return None
    return None


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], wait: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def nspawn_runtime_dir() -> Iterator[None]:
    """nspawn keeps state in /run/systemd/nspawn, which must be a tmpfs here."""
    NSPAWN_RUN.mkdir(parents=True, exist_ok=True)
    mounted = sh("mountpoint", "-q", str(NSPAWN_RUN), check=False).returncode == 0
    if not mounted:
        sh("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(NSPAWN_RUN))
    try:
        yield
    finally:
        if not mounted:
            sh("umount", "-l", str(NSPAWN_RUN), check=False)


# --- a box -------------------------------------------------------------------------------------


@dataclass
class Box:
    name: str
    ip: str
    cpu: int
    root: Path
    key: Path
    log: Path
    boots: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def veth(self) -> str:
        return f"vb-{self.name}"

    def prepare(self, base: Path, hosts: dict[str, str]) -> None:
        """A copy of the base root filesystem made into this box."""
        shutil.rmtree(self.root, ignore_errors=True)
        sh("cp", "-a", "--reflink=auto", str(base), str(self.root), timeout=300)
        (self.root / "etc/hostname").write_text(self.name + "\n")
        (self.root / "etc/hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{ip} {n}\n" for n, ip in hosts.items()))
        (self.root / "etc/systemd/network/10-host0.network").write_text(
            f"[Match]\nName=host0\n\n[Network]\nAddress={self.ip}/24\n"
            "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{self.key}.pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        (self.root / "etc/machine-id").write_text("")  # a fresh id on first boot

    def boot(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"nspawn-{self.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Run nspawn; start it again when the box reboots (exit 133)."""
        with self.log.open("ab") as out:
            while not self._stopping.is_set():
                # A veth left by a box that was killed would make nspawn fail ("File exists").
                sh("ip", "link", "del", self.veth, check=False)
                with self._lock:
                    self.proc = subprocess.Popen(
                        ["taskset", "-c", str(self.cpu), "systemd-nspawn", "--quiet",
                         "-D", str(self.root), "-M", self.name, "-b", "--register=no",
                         "--keep-unit", f"--network-bridge={BRIDGE}", "--resolv-conf=off",
                         "--timezone=off", "--link-journal=no", "--console=read-only"],
                        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True)
                    self.boots += 1
                self._limit_link()
                rc = self.proc.wait()
                out.write(f"\n[nspawn exited {rc}]\n".encode())
                out.flush()
                if rc != 133:
                    return

    def _limit_link(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self._stopping.is_set():
            if sh("ip", "link", "show", self.veth, check=False).returncode == 0:
                sh("tc", "qdisc", "replace", "dev", self.veth, "root", "tbf", "rate", RATE,
                   "burst", "512kb", "latency", "50ms", check=False)
                return
            time.sleep(0.1)

    def pid1(self) -> int:
        """The box's init (its pid 1) as this host numbers it."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        if _ns_pid(child.pid) == 1:
                            return int(child.pid)
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: no init process")

    def nsenter(self, *argv: str, timeout: float = 60, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", "-t", str(self.pid1()), "-a", *argv, timeout=timeout,
                  check=check)

    def ssh_args(self) -> list[str]:
        return ["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=3", "-o", "BatchMode=yes", f"root@{self.ip}"]

    def ssh(self, command: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        return sh(*self.ssh_args(), command, timeout=timeout, check=check)

    def wait_ssh(self, timeout: float = 120) -> float:
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh("true", timeout=10, check=False).returncode == 0:
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.name} ({self.ip}) not reachable over SSH within "
                                   f"{timeout:.0f} s; its console:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.5)

    def stop(self, timeout: float = 10) -> None:
        """Power the box off (nspawn's SIGTERM); if it has not stopped within `timeout`,
        kill nspawn and the box's init, which takes every process of the box with it."""
        self._stopping.set()
        with self._lock:
            proc = self.proc
        init = None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(RuntimeError):
                init = self.pid1()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # nspawn powers the box off
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        if init is not None and _ns_pid(init) == 1:  # still running without its nspawn
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while _ns_pid(init) == 1 and time.monotonic() < deadline:
                time.sleep(0.2)
        if self._thread is not None:
            self._thread.join(30)
        sh("ip", "link", "del", self.veth, check=False)
