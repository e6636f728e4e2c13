"""The Ansible deployment: lint, syntax, inventory, and a real run against this machine.

The real run deploys a CPU worker to localhost without root (no system user, systemd,
firewall or apt): everything goes under tmp_path. To stay fast and offline the
virtualenv it makes reuses this environment's packages through a .pth file
(`specshard_venv_site_dirs`) and installs specshard itself from the checkout with
`pip install --no-deps --no-build-isolation`, so llama-cpp-python is neither downloaded
nor rebuilt (`specshard_llama_cpp_build: false`). The demo model is linked from the
local cache, not downloaded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import models

ROOT = Path(__file__).resolve().parent.parent
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
EXAMPLE = ANSIBLE / "inventories" / "example" / "hosts.yml"
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.MULTILINE)


def ansible_env(tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    if tmp is not None:
        env.update(ANSIBLE_HOME=str(tmp / "ansible-home"),
                   ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"))
    return env


def run(args: list[str], timeout: float, tmp: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=ansible_env(tmp), cwd=ANSIBLE)


def test_lint_production_profile() -> None:
    result = run([str(BIN / "ansible-lint"), "--offline", "--profile", "production",
                  "--nocolor", str(ANSIBLE)], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_syntax_check() -> None:
    result = run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(EXAMPLE),
                  str(ANSIBLE / "site.yml")], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_inventory_graph() -> None:
    result = run([str(BIN / "ansible-inventory"), "-i", str(EXAMPLE), "--graph"], timeout=120)
    assert result.returncode == 0, result.stderr
    for group in ("@cluster:", "@coordinator:", "@gpu_workers:"):
        assert group in result.stdout
    listing = run([str(BIN / "ansible-inventory"), "-i", str(EXAMPLE), "--list"], timeout=120)
    cluster = json.loads(listing.stdout)["cluster"]
    assert set(cluster["children"]) == {"coordinator", "gpu_workers"}


def test_argument_specs_document_the_real_defaults() -> None:
    """Each role's argument spec states the same default as its defaults/main.yml."""
    import yaml

    for role in sorted((ANSIBLE / "roles").iterdir()):
        spec_file = role / "meta" / "argument_specs.yml"
        defaults_file = role / "defaults" / "main.yml"
        if not spec_file.exists() or not defaults_file.exists():
            continue
        options = yaml.safe_load(spec_file.read_text())["argument_specs"]["main"]["options"]
        defaults = yaml.safe_load(defaults_file.read_text()) or {}
        for name, value in defaults.items():
            assert name in options, f"{role.name}: {name} is not in the argument spec"
            assert options[name].get("default") == value, f"{role.name}: {name} differs"


# The services role's ring and worker unit, and the firewall's worker ports, on two
# boxes without deploying anything: roles tagged never give their defaults only.
RING_PLAY = """
- hosts: cluster
  gather_facts: false
  roles:
    - role: specshard
      tags: [never]
    - role: firewall
      tags: [never]
  tasks:
    - ansible.builtin.include_role:
        name: services
        tasks_from: ring
        public: true
    - ansible.builtin.copy:
        content: "{{ {'serve': services_serve_args, 'units': services_units,
                      'open': firewall_worker_ports} | to_json }}"
        dest: "{{ out }}/{{ inventory_hostname }}.json"
        mode: "0644"
    - ansible.builtin.template:
        src: "{{ templates }}/specshard-worker@.service.j2"
        dest: "{{ out }}/{{ inventory_hostname }}.service"
        mode: "0644"
"""


def test_one_worker_per_gpu_listed_in_ring_order(tmp_path: Path) -> None:
    """box1 has two GPUs (as preflight finds them), box2 one on another port: the
    coordinator lists box1's two workers together, each on the base port + GPU index,
    every GPU gets its own unit instance, started with `--gpu <index>`, and the firewall
    opens each worker's port."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    box1 = {**local, "ansible_host": "10.0.0.1", "preflight_gpu_indices": [0, 1]}
    box2 = {**local, "ansible_host": "10.0.0.2", "preflight_gpu_indices": [0],
            "specshard_worker_port": 50061}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"cluster": {"children": {
        "coordinator": {"hosts": {"box1": box1}},
        "gpu_workers": {"hosts": {"box1": box1, "box2": box2}}}}}))
    play_file = tmp_path / "ring.yml"
    play_file.write_text(RING_PLAY)
    paths = {"out": str(tmp_path), "templates": str(ANSIBLE / "roles/services/templates")}
    result = run([str(BIN / "ansible-playbook"), "-i", str(inventory), "-e", json.dumps(paths),
                  str(play_file)], timeout=300, tmp=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    coordinator = json.loads((tmp_path / "box1.json").read_text())
    workers = [a for a in coordinator["serve"] if a.startswith("--worker=")]
    assert workers == ["--worker=10.0.0.1:50051", "--worker=10.0.0.1:50052",
                       "--worker=10.0.0.2:50061"]
    serve = " ".join(coordinator["serve"])
    assert "--ctx 4096 --parallel 1" in serve  # specshard_ctx, specshard_parallel
    assert coordinator["units"] == ["specshard-ray", "specshard-worker@0", "specshard-worker@1",
                                    "specshard-serve"]
    assert coordinator["open"] == [50051, 50052]
    box2_settings = json.loads((tmp_path / "box2.json").read_text())
    assert box2_settings["units"] == ["specshard-ray", "specshard-worker@0"]
    assert box2_settings["open"] == [50061]
    unit = (tmp_path / "box2.service").read_text()
    assert "EnvironmentFile=/etc/specshard/specshard-worker@%i.env" in unit
    assert re.search(r"^ExecStart=\S+/bin/specshard worker --gpu %i --listen "
                     r"\$SPECSHARD_WORKER_LISTEN ", unit, re.MULTILINE)


def test_the_example_inventory_serves_qwq_with_yarn_and_qwens_sampling(tmp_path: Path
                                                                       ) -> None:
    """The example inventory's settings (its group_vars beside a one-box inventory) render
    into a serve command that serve's own parser reads as 16k with YaRN and Qwen's
    sampling."""
    import argparse

    from coordinator.settings import add_arguments, from_args

    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
             "ansible_host": "10.0.0.1", "preflight_gpu_indices": [0]}
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"cluster": {"children": {
        "coordinator": {"hosts": {"box1": local}},
        "gpu_workers": {"hosts": {"box1": local}}}}}))
    (tmp_path / "group_vars" / "all").mkdir(parents=True)
    shutil.copy(EXAMPLE.parent / "group_vars" / "all" / "main.yml",
                tmp_path / "group_vars" / "all" / "main.yml")
    play_file = tmp_path / "ring.yml"
    play_file.write_text(RING_PLAY)
    paths = {"out": str(tmp_path), "templates": str(ANSIBLE / "roles/services/templates"),
             # what the vault holds (vault.yml.example)
             "vault_specshard_worker_token": "t" * 32, "vault_specshard_api_key": "k" * 32}
    result = run([str(BIN / "ansible-playbook"), "-i", str(inventory), "-e", json.dumps(paths),
                  str(play_file)], timeout=300, tmp=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    serve = json.loads((tmp_path / "box1.json").read_text())["serve"]
    assert "--rope-scaling=yarn" in serve and "--temp=0.6" in serve
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_args(parser.parse_args(serve))
    assert (settings.ctx, settings.parallel) == (16384, 1)
    assert (settings.rope_scaling, settings.rope_scale, settings.yarn_orig_ctx) == \
        ("yarn", 4.0, 32768)
    assert (settings.temp, settings.top_p, settings.top_k, settings.min_p) == \
        (0.6, 0.95, 40, 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recap(output: str) -> dict[str, int]:
    found = RECAP.findall(output)
    assert found, f"no PLAY RECAP in:\n{output[-3000:]}"
    host, ok, changed, unreachable, failed = found[-1]
    return {"ok": int(ok), "changed": int(changed), "unreachable": int(unreachable),
            "failed": int(failed)}


def health(port: int, tls_dir: Path, token: str, timeout: float = 3.0) -> int:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        private_key=(tls_dir / "node.key").read_bytes(),
        certificate_chain=(tls_dir / "node.crt").read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                             options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout,
            metadata=(("authorization", f"Bearer {token}"),))
    return int(reply.status)


def wait_healthy(port: int, tls_dir: Path, token: str, within: float = 60.0) -> int:
    deadline = time.monotonic() + within
    while True:
        try:
            return health(port, tls_dir, token)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stop_pid_file(pid_file: Path) -> None:
    """Stop the worker the playbook started, by its recorded pid (TERM, then KILL)."""
    if not pid_file.is_file():
        return
    pid = int(pid_file.read_text().strip())
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@dataclass(frozen=True)
class LocalDeploy:
    tmp: Path
    inventory: Path
    extra: Path
    port: int
    token: str
    pid_file: Path


@pytest.fixture()
def local_deploy(tmp_path: Path) -> Iterator[LocalDeploy]:
    target = models.demo_path(models.DEMO_TARGET)
    if not target.exists():
        pytest.fail("demo target missing: run `specshard models fetch` (make test does)")
    port = free_port()
    token = secrets.token_urlsafe(32)
    inventory = tmp_path / "inventory" / "hosts.yml"
    inventory.parent.mkdir()
    inventory.write_text(json.dumps({"cluster": {"children": {
        "coordinator": {"hosts": {}},
        "gpu_workers": {"hosts": {"localhost": {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}},
    }}}))
    settings = {
        # Nothing privileged, no GPU, no Ray (it needs systemd and a coordinator).
        "specshard_gpu": False, "specshard_become": False, "specshard_system_user": False,
        "specshard_system_packages": False, "specshard_service_manager": "none",
        "specshard_firewall": False, "specshard_ray": False, "specshard_worker_tls": True,
        # Everything under tmp_path.
        "specshard_prefix": str(tmp_path / "opt"),
        "specshard_config_dir": str(tmp_path / "etc"),
        "specshard_home": str(tmp_path / "home"),
        "specshard_run_dir": str(tmp_path / "run"),
        # Fast and offline: a venv that sees this environment's packages.
        "specshard_python": getattr(sys, "_base_executable", sys.executable),
        "specshard_venv_site_dirs": [sysconfig.get_paths()["purelib"]],
        "specshard_pip_args": ["--no-deps", "--no-build-isolation", "--quiet"],
        "specshard_llama_cpp_build": False,
        "specshard_wheelhouse": "",  # no wheels gathered (the default gathers them)
        "specshard_model_target": {"filename": target.name, "path": str(target.resolve())},
        "specshard_worker_listen": f"127.0.0.1:{port}",
        "specshard_worker_token": token,
    }
    # A snapshot of the checkout, so edits made meanwhile cannot change the second run.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, checkout / name)
    for name in ("cluster", "worker", "coordinator"):
        shutil.copytree(ROOT / name, checkout / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    settings["specshard_checkout"] = str(checkout)
    settings["specshard_build_dir"] = str(tmp_path / "build")
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps(settings))
    pid_file = tmp_path / "run" / "worker.pid"
    ctl = tmp_path / "opt" / "libexec" / "specshard-worker-ctl"
    try:
        yield LocalDeploy(tmp_path, inventory, extra, port, token, pid_file)
    finally:
        if ctl.is_file():
            subprocess.run([str(ctl), "stop"], capture_output=True, timeout=60)
        stop_pid_file(pid_file)


def play(deploy: LocalDeploy, *extra: str) -> subprocess.CompletedProcess[str]:
    return run([str(BIN / "ansible-playbook"), "-i", str(deploy.inventory),
                "-e", f"@{deploy.extra}", str(ANSIBLE / "site.yml"), *extra],
               timeout=900, tmp=deploy.tmp)


@pytest.mark.slow
def test_deploy_a_cpu_worker_to_localhost(local_deploy: LocalDeploy) -> None:
    tmp, port, token = local_deploy.tmp, local_deploy.port, local_deploy.token

    first = play(local_deploy)
    assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
    first_recap = recap(first.stdout)
    assert first_recap["failed"] == 0 and first_recap["changed"] > 0

    venv = tmp / "opt" / "venv"
    assert (venv / "bin" / "specshard").is_file()
    # The playbook cuts no stage: a worker cuts the one the coordinator's plan gives it.
    assert not list((tmp / "home" / "stages").glob("*.gguf"))
    tls_dir = tmp / "etc" / "tls"
    assert wait_healthy(port, tls_dir, token) == health_pb2.HealthCheckResponse.SERVING
    pid = int(local_deploy.pid_file.read_text())
    os.kill(pid, 0)  # the recorded pid is the live worker

    second = play(local_deploy)
    assert second.returncode == 0, second.stdout[-6000:] + second.stderr[-3000:]
    second_recap = recap(second.stdout)
    print("first run: ", first_recap, "\nsecond run:", second_recap)
    assert second_recap["failed"] == 0 and second_recap["changed"] == 0, second.stdout[-6000:]
    assert int(local_deploy.pid_file.read_text()) == pid  # not restarted
    assert health(port, tls_dir, token) == health_pb2.HealthCheckResponse.SERVING

    check = play(local_deploy, "--check", "--diff")
    assert check.returncode == 0, check.stdout[-6000:] + check.stderr[-3000:]
    check_recap = recap(check.stdout)
    print("--check --diff:", check_recap)
    assert check_recap["failed"] == 0 and check_recap["changed"] == 0, check.stdout[-6000:]
    assert int(local_deploy.pid_file.read_text()) == pid


# --- pieces of the playbook on their own ------------------------------------------------------

FETCH = ANSIBLE / "roles" / "models" / "files" / "fetch_model.py"


def test_the_controller_download_resumes_and_checks_the_sha256(tmp_path: Path) -> None:
    """fetch_model.py against a real HTTP server on loopback whose first reply breaks off
    mid-file: the second request asks for the rest (Range), the file is whole and
    verified, a later run does not download again, and a wrong sha256 keeps no file."""
    from tests.deploy.http_files import serve_files

    blob = tmp_path / "srv" / "model.gguf"
    blob.parent.mkdir()
    blob.write_bytes(os.urandom(3 << 20))
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    out = tmp_path / "cache" / "model.gguf"
    with serve_files(blob.parent, cut_first=1 << 20) as files:
        argv = [sys.executable, str(FETCH), "--url", f"{files.url}/model.gguf", "--sha256", sha,
                "--out", str(out)]
        first = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("downloaded")
        assert files.ranges == ["", f"bytes={1 << 20}-"]  # resumed where it broke off
        assert out.read_bytes() == blob.read_bytes()
        again = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert again.stdout.startswith("present") and len(files.ranges) == 2
        bad = subprocess.run([*argv[:5], "0" * 64, "--out", str(tmp_path / "bad.gguf")],
                             capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "expected 000" in bad.stderr
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.part").exists()


COPY = ANSIBLE / "roles" / "models" / "files" / "model_copy.py"
# ssh as the receiving box's sshd runs a key with a forced command: the forced command,
# with the client's command (the last two arguments) in SSH_ORIGINAL_COMMAND.
FAKE_SSH = f"""#!{sys.executable}
import os, sys
with open(os.environ["FAKE_SSH_ARGS"], "w") as out:
    out.write("\\n".join(sys.argv[1:]))
os.environ.update(SSH_ORIGINAL_COMMAND=" ".join(sys.argv[-2:]), SSH_CLIENT="10.0.0.1 4000 22")
forced = os.environ["FAKE_SSH_FORCED"].split()
os.execv(forced[0], forced)
"""


def test_the_box_to_box_copy_resumes_and_checks_the_sha256(tmp_path: Path) -> None:
    """model_copy.py send to model_copy.py receive (the copy key's forced command, run
    by a stand-in for ssh as sshd would): the copy resumes from the part an interrupted
    one kept, a box that holds the file receives nothing, a name the forced command does
    not list is refused, a wrong sha256 keeps no file, and kept bytes that do not check
    out are dropped and the copy starts over."""
    blob = tmp_path / "src" / "m.gguf"
    blob.parent.mkdir()
    blob.write_bytes(os.urandom(3 << 20))
    sha = hashlib.sha256(blob.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    dest.mkdir()
    fake = tmp_path / "bin" / "ssh"
    fake.parent.mkdir()
    fake.write_text(FAKE_SSH)
    fake.chmod(0o755)
    args_file = tmp_path / "ssh-args"

    def send(name: str = "m.gguf", want: str = sha) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}",
                   FAKE_SSH_ARGS=str(args_file),
                   FAKE_SSH_FORCED=f"{sys.executable} {COPY} receive --dir {dest} "
                                   f"--file m.gguf={want}")
        return subprocess.run(
            [sys.executable, str(COPY), "send", "--path", str(blob), "--name", name,
             "--to", "10.0.0.2", "--key", str(tmp_path / "key"),
             "--known-hosts", str(tmp_path / "known_hosts"), "--alias", "box2"],
            capture_output=True, text=True, timeout=60, env=env)

    part = dest / ".m.gguf.part"
    part.write_bytes(blob.read_bytes()[:1 << 20])  # what an interrupted copy kept
    first = send()
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) | {"seconds": 0} == {
        "result": "sent", "from": 1 << 20, "bytes": 2 << 20, "seconds": 0}
    assert (dest / "m.gguf").read_bytes() == blob.read_bytes() and not part.exists()
    ssh_args = args_file.read_text().split("\n")
    for option in ("IdentitiesOnly=yes", "BatchMode=yes", "StrictHostKeyChecking=yes",
                   f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "HostKeyAlias=box2"):
        assert option in ssh_args
    assert ssh_args[-3:] == ["10.0.0.2", "receive", "m.gguf"]
    assert json.loads(send().stdout)["result"] == "present"
    refused = send(name="other.gguf")
    assert refused.returncode == 1 and "refused: 'receive other.gguf'" in refused.stderr
    (dest / "m.gguf").unlink()
    wrong = send(want="0" * 64)
    assert wrong.returncode == 1 and "expected 000" in wrong.stderr
    assert not list(dest.iterdir())
    part.write_bytes(os.urandom(1000))  # kept bytes that are not the model's
    again = send()
    assert again.returncode == 0 and json.loads(again.stdout)["from"] == 0, again.stderr
    assert (dest / "m.gguf").read_bytes() == blob.read_bytes() and not part.exists()


CA_PLAY = """
- hosts: localhost
  gather_facts: false
  roles:
    - role: specshard
      tags: [never]
    - role: services  # its handlers (a new certificate restarts the services)
      tags: [never]
    - role: ca
"""


def test_certificates_are_renewed_before_they_expire(tmp_path: Path) -> None:
    """The ca role reissues a box's certificate when fewer than ca_renew_days remain, and
    leaves a valid one alone."""
    inventory = tmp_path / "hosts.yml"
    inventory.write_text(json.dumps({"all": {"hosts": {"localhost": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable}}}}))
    play_file = tmp_path / "ca.yml"
    play_file.write_text(CA_PLAY)
    settings = {"specshard_become": False, "specshard_system_user": False,
                "specshard_config_dir": str(tmp_path / "etc"), "ca_dir": str(tmp_path / "pki")}
    crt = tmp_path / "pki" / "localhost.crt"

    def issue(**more: object) -> dict[str, int]:
        result = run([str(BIN / "ansible-playbook"), "-i", str(inventory), "-e",
                      json.dumps({**settings, **more}), str(play_file)], timeout=300,
                     tmp=tmp_path)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        return recap(result.stdout)

    issue()
    first = crt.read_bytes()
    assert issue()["changed"] == 0 and crt.read_bytes() == first  # valid: kept
    # 825-day certificates, renewed when fewer than 900 days remain: now.
    assert issue(ca_renew_days=900)["changed"] > 0 and crt.read_bytes() != first
    installed = (tmp_path / "etc" / "tls" / "node.crt").read_bytes()
    assert installed == crt.read_bytes()  # and the box got the new one
