"""`make deploy-test`: the real playbook on two booted machines (tests/deploy/boxes.py).

box1 runs the coordinator and a worker, box2 a worker; each box has one core and a
1 Gbit/s link. From a clean start: the playbook over SSH (wheelhouse and model gathered
once on this host, the controller; the wheelhouse pushed to both boxes, the model to
box1 only, which copies it to box2 over SSH with a key made for that copy), a chat
through the deployed API (the hidden states cross the bridge), the playbook again
(`changed=0`) and in `--check --diff` (`changed=0`), ufw (a worker port closed to a
non-member, open to the peer), a rolling restart of the workers while a stream runs (the
stream completes), a changed coordinator setting while a stream runs (the coordinator
drains it, then restarts), a reboot of box2 (the cluster recovers and serves), the
coordinator's journal (load progress and ring events at INFO), everything torn down, on
failure too. The report lines, the timings and the verdict are also written to
last-run/report.txt.

Needs root, systemd-nspawn, debootstrap, apt-cacher-ng (.ci/run installs them). Named
so that `make test` does not collect it; run it with `make deploy-test`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from cluster import models
from tests.deploy import boxes
from tests.deploy.http_files import serve_files

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
LLAMA_CPP = "0.3.36"
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                   re.MULTILINE)
BOXES = {"box1": (f"{boxes.NET}.11", 0), "box2": (f"{boxes.NET}.12", 1)}
WORKER_PORT = 50051
HTTP_PORT = 8000
PLAYBOOK_TIMEOUT_S = 1800


def say(message: str) -> None:
    print(f"[deploy-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextmanager
def step(name: str, timings: dict[str, float]) -> Iterator[None]:
    say(f"{name} …")
    t0 = time.monotonic()
    yield
    timings[name] = round(time.monotonic() - t0, 1)
    say(f"{name}: {timings[name]} s")


def cmake_args() -> str:
    """The Makefile's llama.cpp flags (make exports CMAKE_ARGS), so the wheel `make`
    built is the one the boxes get."""
    if os.environ.get("CMAKE_ARGS"):
        return " ".join(os.environ["CMAKE_ARGS"].split())
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    found = re.search(r"^export CMAKE_ARGS \?=(.*)$", text, re.MULTILINE)
    assert found, "CMAKE_ARGS not found in the Makefile"
    return " ".join(found.group(1).split())


def seed_wheelhouse(root: Path, args: str) -> None:
    """Put the llama-cpp-python wheel `make` built (same version and flags) where the
    playbook's wheelhouse step looks, so it is not built a second time."""
    key = hashlib.sha256(f"{LLAMA_CPP} {args}".encode()).hexdigest()[:12]
    dest = root / key
    if list(dest.glob(f"llama_cpp_python-{LLAMA_CPP}-*.whl")):
        return
    # The user's cache (tests/conftest.py points SPECSHARD_HOME at a per-run folder whose
    # models/ links there).
    home = models.demo_path(models.DEMO_TARGET).resolve().parent.parent
    built = sorted((home / "wheels").glob(f"*/llama_cpp_python-{LLAMA_CPP}-*.whl"))
    assert built, f"no llama-cpp-python {LLAMA_CPP} wheel under {home}/wheels: run make first"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built[-1], dest / built[-1].name)


@dataclass
class Run:
    stdout: str
    returncode: int
    recap: dict[str, dict[str, int]] = field(default_factory=dict)
    lines_at: list[tuple[float, str]] = field(default_factory=list)


@dataclass
class Lab:
    work: Path
    inventory: Path
    key: str
    token: str
    boxes: dict[str, boxes.Box]
    timings: dict[str, float] = field(default_factory=dict)
    report: list[str] = field(default_factory=list)
    verdict: str = "not run"

    @property
    def api(self) -> str:
        return f"http://{BOXES['box1'][0]}:{HTTP_PORT}"

    def playbook(self, *extra: str, log_name: str,
                 on_line: Callable[[str], None] | None = None) -> Run:
        env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_FORCE_COLOR="0", ANSIBLE_HOME=str(self.work / "ansible-home"),
                   ANSIBLE_LOCAL_TEMP=str(self.work / "ansible-tmp"),
                   ANSIBLE_HOST_KEY_CHECKING="False",
                   PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
        log = self.work / f"{log_name}.log"
        run = Run("", -1)
        with log.open("w") as out:
            proc = subprocess.Popen(
                [str(BIN / "ansible-playbook"), "-i", str(self.inventory), "site.yml", *extra],
                cwd=ANSIBLE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True)
            timer = threading.Timer(PLAYBOOK_TIMEOUT_S, proc.kill)
            timer.start()
            try:
                assert proc.stdout is not None
                t0 = time.monotonic()
                for line in proc.stdout:
                    if line.startswith(("TASK [", "RUNNING HANDLER [", "PLAY RECAP")):
                        out.write(f"[+{time.monotonic() - t0:.1f} s] ")
                    out.write(line)
                    out.flush()
                    run.lines_at.append((time.monotonic(), line))
                    if on_line is not None:
                        on_line(line)
                run.returncode = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
        run.stdout = "".join(line for _, line in run.lines_at)
        for host, ok, changed, unreachable, failed in RECAP.findall(run.stdout):
            run.recap[host] = {"ok": int(ok), "changed": int(changed),
                               "unreachable": int(unreachable), "failed": int(failed)}
        assert run.returncode == 0 and run.recap, (
            f"ansible-playbook {' '.join(extra)} failed (log: {log}):\n{run.stdout[-8000:]}")
        return run

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.api + "/v1", api_key=self.key, timeout=600,
                             max_retries=0)

    def cluster(self) -> dict[str, object]:
        reply = httpx.get(self.api + "/v1/cluster", timeout=30,
                          headers={"Authorization": f"Bearer {self.key}"})
        reply.raise_for_status()
        return dict(reply.json())

    def wait_serving(self, timeout: float) -> float:
        """Until /v1/cluster lists both workers healthy; returns the seconds waited."""
        t0 = time.monotonic()
        last = ""
        while time.monotonic() - t0 < timeout:
            try:
                info = self.cluster()
                nodes = info["nodes"]
                assert isinstance(nodes, list)
                if len(nodes) == 2 and all(n["healthy"] for n in nodes):
                    return time.monotonic() - t0
                last = json.dumps(nodes)[:500]
            except (httpx.HTTPError, KeyError) as exc:
                last = repr(exc)
            time.sleep(1)
        raise TimeoutError(f"the cluster did not serve within {timeout:.0f} s: {last}")

    def ask(self, prompt: str, max_tokens: int = 24) -> str:
        reply = self.client().chat.completions.create(
            model="", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0)
        return reply.choices[0].message.content or ""


def tx_bytes(veth: str) -> int:
    return int(Path(f"/sys/class/net/{veth}/statistics/tx_bytes").read_text())


def rx_bytes(veth: str) -> int:
    return int(Path(f"/sys/class/net/{veth}/statistics/rx_bytes").read_text())


def task_output(stdout: str, task: str) -> list[str]:
    """The result lines a task printed (its header starts with `TASK [<task>`)."""
    lines: list[str] = []
    inside = False
    for line in stdout.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [", "PLAY RECAP")):
            inside = line.startswith(f"TASK [{task}")
        elif inside and line.strip():
            lines.append(line.strip())
    return lines


def main_pid(box: boxes.Box, unit: str) -> int:
    return int(box.ssh(f"systemctl show -p MainPID --value {unit}").stdout.strip() or 0)


def reachable(connect: list[str]) -> bool:
    return subprocess.run(connect, capture_output=True, timeout=30).returncode == 0


def keep_logs(work: Path) -> None:
    """The playbook logs and the boxes' consoles outlive the run, for a post-mortem."""
    kept = boxes.CACHE / "last-run"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    for path in [*work.glob("*.log"), *work.glob("*.console"), *work.glob("report.txt")]:
        shutil.copy2(path, kept / path.name)
    say(f"logs kept in {kept}")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    missing = boxes.need_tools()
    if missing:
        pytest.fail("deploy-test needs " + ", ".join(missing) + " (apt-get install "
                    "systemd-container debootstrap apt-cacher-ng iproute2 openssh-client)")
    target = models.demo_path(models.DEMO_TARGET).resolve()
    if not target.exists():
        pytest.fail("demo target missing: run `specshard models fetch` (make does)")
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="specshard-deploy-", dir="/var/tmp"))
        stack.callback(shutil.rmtree, work, True)
        stack.callback(keep_logs, work)
        log: list[str] = []
        with step("root filesystem (cached)", timings):
            base = boxes.rootfs(log)
        key_file = boxes.ssh_key()
        stack.enter_context(boxes.nspawn_runtime_dir())
        stack.enter_context(boxes.bridge())
        stack.enter_context(boxes.apt_proxy(work))
        files = stack.enter_context(serve_files(target.parent))
        the_boxes = {name: boxes.Box(name, ip, cpu, work / name, key_file, work / f"{name}.console")
                     for name, (ip, cpu) in BOXES.items()}
        hosts = {name: ip for name, (ip, _) in BOXES.items()}
        with step("two boxes booted, SSH answering", timings):
            for box in the_boxes.values():
                box.prepare(base, hosts)
            for box in the_boxes.values():
                stack.callback(box.stop)
                box.boot()
            for box in the_boxes.values():
                box.wait_ssh(120)
        # The checkout as it is now: edits made meanwhile cannot change the later runs.
        checkout = work / "checkout"
        checkout.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, checkout / name)
        for name in ("cluster", "worker", "coordinator"):
            shutil.copytree(ROOT / name, checkout / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        args = cmake_args()
        wheelhouse = boxes.CACHE / "wheelhouse"
        seed_wheelhouse(wheelhouse, args)
        key, token = secrets.token_hex(24), secrets.token_hex(24)
        common = {
            "ansible_user": "root", "ansible_ssh_private_key_file": str(key_file),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no "
                                       "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            "ansible_python_interpreter": "/usr/bin/python3",
            "specshard_gpu": False, "specshard_ray": False, "specshard_worker_tls": True,
            "specshard_firewall": True, "firewall_http_sources": [boxes.HOST_IP],
            "specshard_wheelhouse": str(wheelhouse), "specshard_llama_cpp_cmake_args": args,
            "specshard_checkout": str(checkout), "specshard_build_dir": str(work / "build"),
            "models_controller_dir": str(boxes.CACHE / "controller-models"),
            "specshard_model_target": {
                "url": f"{files.url}/{target.name}", "sha256": models.DEMO_TARGET.sha256,
                "filename": target.name, "size_gb": 1},
            "specshard_model_draft": {},
            "specshard_ctx": 2048, "specshard_parallel": 2, "specshard_drain_timeout": 10,
            "services_start_timeout": 300, "services_load_timeout": 600,
            "specshard_worker_token": token, "specshard_api_key": key,
        }
        inventory = work / "inventory" / "hosts.yml"
        inventory.parent.mkdir()
        host = {name: {"ansible_host": ip} for name, ip in hosts.items()}
        inventory.write_text(json.dumps({"cluster": {
            "children": {"coordinator": {"hosts": {"box1": host["box1"]}},
                         "gpu_workers": {"hosts": host}},
            "vars": common}}, indent=1))
        lab = Lab(work, inventory, key, token, the_boxes, timings, log)
        try:
            yield lab
        finally:
            timings["total"] = round(time.monotonic() - t_all, 1)
            say("timings (s): " + json.dumps(timings))
            for line in lab.report:
                say(line)
            say(f"verdict: {lab.verdict}")
            # Kept with the logs (keep_logs, at teardown): what this run printed last.
            (work / "report.txt").write_text(
                f"deploy-test {time.strftime('%Y-%m-%d %H:%M:%S')}\nverdict: {lab.verdict}\n"
                f"timings (s): {json.dumps(timings)}\n" + "\n".join(lab.report) + "\n")


def test_two_boxes(lab: Lab) -> None:
    try:
        check_two_boxes(lab)
    except BaseException as exc:
        lab.verdict = f"FAIL: {type(exc).__name__}: {str(exc)[:3000]}"
        raise
    lab.verdict = "PASS"


def stream_sse(lab: Lab, prompt: str, max_tokens: int, outcome: dict[str, object],
               chunks: list[tuple[float, str]]) -> None:
    """A streamed chat read as the raw event stream (the openai client hides whether
    `data: [DONE]` came): each chunk's time and text, the status, the finish reason."""
    body = {"model": "", "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "messages": [{"role": "user", "content": prompt}]}
    try:
        with httpx.stream("POST", lab.api + "/v1/chat/completions", json=body, timeout=600,
                          headers={"Authorization": f"Bearer {lab.key}"}) as reply:
            outcome["status"] = reply.status_code
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    outcome["done"] = True
                    continue
                for choice in json.loads(line[len("data: "):]).get("choices", []):
                    chunks.append((time.monotonic(), (choice.get("delta") or {}).get(
                        "content") or ""))
                    if choice.get("finish_reason"):
                        outcome["finish"] = choice["finish_reason"]
    except Exception as exc:  # reported by the caller
        outcome["error"] = repr(exc)


def check_model_copied_box_to_box(lab: Lab, stdout: str,
                                  marks: list[tuple[str, float, int, int]]) -> None:
    """The controller sent the model once, to box1; box1 sent it to box2 (box2's journal
    says so, from box1's address, sha256 verified); no copy key is left authorized."""
    box1, box2 = lab.boxes["box1"], lab.boxes["box2"]
    size = models.DEMO_TARGET.size
    name = models.DEMO_TARGET.filename
    begin = next(i for i, m in enumerate(marks)
                 if m[0].startswith("TASK [models : Copy the models from the controller"))
    end = next(i for i, m in enumerate(marks) if i > begin and not m[0].startswith(
        "TASK [models : "))
    seconds = marks[end][1] - marks[begin][1]
    from_controller = marks[end][2] - marks[begin][2]
    from_box1 = marks[end][3] - marks[begin][3]
    pushed = [line for line in task_output(stdout, "models : Copy the models from the "
                                                   "controller") if line.startswith("changed")]
    sent = [line for line in task_output(stdout, "models : Send the models box to box")
            if line.startswith("changed")]
    journal = box2.ssh("journalctl -t specshard-model-copy --no-pager -o cat",
                       check=False).stdout.strip()
    left = {b.name: b.ssh("grep -c specshard-model-copy /root/.ssh/authorized_keys; "
                          "ls -d /tmp/*.specshard-model-copy 2>/dev/null | wc -l",
                          check=False).stdout.split() for b in (box1, box2)}
    lab.report.append(
        f"model: the controller sent {from_controller / 1e6:.0f} MB into the bridge while "
        f"the models role ran ({seconds:.0f} s; the model is {size / 1e6:.0f} MB), box1 "
        f"{from_box1 / 1e6:.0f} MB; pushed from the controller: {pushed}; box to box: "
        f"{sent}; box2's journal: {journal!r}; copy keys authorized, key pairs left "
        f"(box: [keys, pairs]): {left}")
    assert pushed == [f"changed: [box1] => (item={name})"], pushed
    assert sent == [f"changed: [box1] => (item={name} to box2)"], sent
    assert re.search(rf"received {re.escape(name)} from {re.escape(BOXES['box1'][0])}: "
                     rf"bytes 0-{size} in [\d.]+ s, sha256 {models.DEMO_TARGET.sha256} "
                     r"verified", journal), journal
    assert size < from_box1 < 1.2 * size  # box1 sent it on, once
    assert from_controller < 1.3 * size  # the controller sent it once, not twice
    assert left == {"box1": ["0", "0"], "box2": ["0", "0"]}, left


def check_two_boxes(lab: Lab) -> None:
    box1, box2 = lab.boxes["box1"], lab.boxes["box2"]
    t = lab.timings

    # Bytes at each task's start: what this host (the controller) sent into the bridge
    # (the bridge device counts only its own traffic, not what it forwards between the
    # boxes) and what box1 sent (its link's host end receives it).
    marks: list[tuple[str, float, int, int]] = []

    def mark(line: str) -> None:
        if line.startswith(("TASK [", "PLAY RECAP")):
            marks.append((line, time.monotonic(), tx_bytes(boxes.BRIDGE), rx_bytes(box1.veth)))

    with step("first playbook run", t):
        first = lab.playbook(log_name="run1", on_line=mark)
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in first.recap.values())
    lab.report.append(f"first run: {first.recap}")
    check_model_copied_box_to_box(lab, first.stdout, marks)
    with step("cluster serving", t):
        lab.wait_serving(300)
    info = lab.cluster()
    nodes = info["nodes"]
    assert isinstance(nodes, list)
    assert [n["address"] for n in nodes] == [f"{BOXES['box1'][0]}:{WORKER_PORT}",
                                            f"{BOXES['box2'][0]}:{WORKER_PORT}"]
    assert [n["hostname"] for n in nodes] == ["box1", "box2"]
    layers = [f"{n['stage']['begin']}:{n['stage']['end']}" for n in nodes]
    lab.report.append(f"ring: box1 layers {layers[0]}, box2 layers {layers[1]}")
    # One stage file per worker: the one it cut when the coordinator loaded it.
    for box in (box1, box2):
        stages = box.ssh("ls /var/lib/specshard/stages").stdout.split()
        assert len(stages) == 1 and re.search(r"-L\d+-\d+\.gguf$", stages[0]), stages

    with step("chat through the deployed API", t):
        before = tx_bytes(box2.veth)
        answer = lab.ask("What is the capital of France? Answer in one word.")
        crossed = tx_bytes(box2.veth) - before
    lab.report.append(f"answer: {answer!r} ({crossed} bytes into box2 meanwhile)")
    page = httpx.get(lab.api + "/", timeout=30)  # the status page, installed with the package
    assert page.status_code == 200 and "/status/status.js" in page.text
    assert httpx.get(lab.api + "/status/status.js", timeout=30).status_code == 200
    assert httpx.get(lab.api + "/v1/status/events", timeout=30).status_code == 401
    assert "paris" in answer.lower()
    assert crossed > 10_000  # hidden states went box1 → box2

    with step("second playbook run", t):
        second = lab.playbook(log_name="run2")
    lab.report.append(f"second run: {second.recap}")
    assert all(r["changed"] == 0 and r["failed"] == 0 for r in second.recap.values()), \
        second.stdout[-6000:]

    with step("playbook --check --diff", t):
        check = lab.playbook("--check", "--diff", log_name="check")
    lab.report.append(f"--check --diff: {check.recap}")
    assert all(r["changed"] == 0 and r["failed"] == 0 for r in check.recap.values()), \
        check.stdout[-6000:]

    # box2 lost its copy but kept the first 400 MB of it, as an interrupted copy would;
    # ufw is active now. `--tags models` copies the rest from box1 (resumed where the
    # part ends), opening SSH on box2 to box1's address alone meanwhile and closing it.
    with step("model copy resumed box to box", t):
        name, size, kept = models.DEMO_TARGET.filename, models.DEMO_TARGET.size, 400_000_000
        rules = box2.ssh("ufw status numbered").stdout
        box2.ssh(f"cd /var/lib/specshard/models && head -c {kept} {name} > .{name}.part "
                 f"&& rm {name} .{name}.source")
        resumed = lab.playbook("--tags", "models", log_name="resume")
        rules_after = box2.ssh("ufw status numbered").stdout
        received = box2.ssh("journalctl -t specshard-model-copy --no-pager -o cat | tail -n 1",
                            check=False).stdout.strip()
    opened = [line for line in task_output(resumed.stdout, "models : Let the sending box "
                                                           "reach SSH") if "changed" in line]
    closed = [line for line in task_output(resumed.stdout, "models : Close ufw to the "
                                                           "sending box") if "changed" in line]
    lab.report.append(f"model copy resumed: {received!r}; ufw opened {opened}, closed "
                      f"{closed}, rules as before: {rules_after == rules}; {resumed.recap}")
    assert f"from {BOXES['box1'][0]}: bytes {kept}-{size} " in received, received
    assert opened == closed == [f"changed: [box2] => (item={BOXES['box1'][0]})"], \
        (opened, closed)
    assert rules_after == rules and "Status: active" in rules, (rules, rules_after)

    with step("ufw", t):
        probe = ("import socket,sys; s=socket.socket(); s.settimeout(3); "
                 "sys.exit(s.connect_ex((sys.argv[1], int(sys.argv[2]))))")
        worker2 = [BOXES["box2"][0], str(WORKER_PORT)]
        from_outside = reachable([sys.executable, "-c", probe, *worker2])
        from_peer = reachable(["nsenter", "-t", str(box1.pid1()), "-a", "python3", "-c",
                               probe, *worker2])
        api_from_host = reachable([sys.executable, "-c", probe, BOXES["box1"][0],
                                   str(HTTP_PORT)])
        status = box2.ssh("ufw status").stdout
    lab.report.append(f"ufw: box2:{WORKER_PORT} from {boxes.HOST_IP} (not a member): "
                      f"{'open' if from_outside else 'closed'}; from box1: "
                      f"{'open' if from_peer else 'closed'}; box1:{HTTP_PORT} from "
                      f"{boxes.HOST_IP} (listed): {'open' if api_from_host else 'closed'}")
    assert "Status: active" in status
    assert not from_outside and from_peer and api_from_host

    with step("rolling restart during a stream", t):
        pids = {name: main_pid(b, "specshard-worker@0") for name, b in lab.boxes.items()}
        chunks: list[tuple[float, str]] = []
        outcome: dict[str, object] = {}

        def stream() -> None:
            try:
                events = lab.client().chat.completions.create(
                    model="", temperature=0, max_tokens=450, stream=True,
                    messages=[{"role": "user", "content":
                               "Count from 1 to 500, one number per line, nothing else."}])
                for c in events:
                    if c.choices:
                        chunks.append((time.monotonic(), c.choices[0].delta.content or ""))
                        if c.choices[0].finish_reason:
                            outcome["finish"] = c.choices[0].finish_reason
            except Exception as exc:  # reported below
                outcome["error"] = repr(exc)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not chunks and time.monotonic() < deadline and reader.is_alive():
            time.sleep(0.2)
        assert chunks, f"the stream did not start: {outcome}"
        env = {"GOMP_SPINCOUNT": "10000", "SPECSHARD_LOG_LEVEL": "info",
               "SPECSHARD_DEPLOY_TEST_ROUND": "rolling"}
        rolling = lab.playbook("--tags", "services", "-e",
                               json.dumps({"services_worker_env": env}), log_name="rolling")
        reader.join(600)
        assert not reader.is_alive(), "the stream did not end"
        after = {name: main_pid(b, "specshard-worker@0") for name, b in lab.boxes.items()}
    restarts = [at for at, line in rolling.lines_at if "Restart the workers" in line]
    assert restarts, rolling.stdout[-4000:]
    text = "".join(piece for _, piece in chunks)
    (lab.work / "stream.log").write_text(text)
    lab.report.append(
        f"rolling restart: worker pids {pids} -> {after}; the stream ran "
        f"{chunks[-1][0] - chunks[0][0]:.0f} s, {len(chunks)} chunks, finish "
        f"{outcome.get('finish')}, error {outcome.get('error')}; handler started "
        f"{restarts[0] - chunks[0][0]:.0f} s into the stream and the playbook ended "
        f"{rolling.lines_at[-1][0] - chunks[0][0]:.0f} s into it; its last line: "
        f"{text.strip().splitlines()[-1] if text.strip() else ''!r}")
    assert "error" not in outcome and outcome.get("finish") in ("length", "stop")
    assert all(after[n] != pids[n] and after[n] > 0 for n in pids)  # both restarted
    # Both boxes restarted (one at a time) while the stream ran.
    assert chunks[0][0] < restarts[0] and rolling.lines_at[-1][0] < chunks[-1][0]
    # Replayed after each restart, the count goes on where it was: 1, 2, 3, … unbroken.
    counted = text.split()
    assert counted[:3] == ["1", "2", "3"], text[:300]
    whole = counted if outcome.get("finish") == "stop" else counted[:-1]  # last may be cut
    assert whole == [str(k) for k in range(1, len(whole) + 1)], text[-500:]

    # A changed coordinator setting (its drain timeout: a new env file and unit) notifies
    # the coordinator's restart handler while a short stream runs. The handler restarts
    # it; on SIGTERM it stops admitting and gives the running request the old drain
    # timeout (10 s) to finish, then ends it with finish_reason "abort" — either way the
    # stream ends cleanly (a finish reason, then [DONE]) — and the run waits for /health.
    with step("coordinator restart during a stream", t):
        serve_pid = main_pid(box1, "specshard-serve")
        worker_pids = {name: main_pid(b, "specshard-worker@0") for name, b in lab.boxes.items()}
        short: list[tuple[float, str]] = []
        ended: dict[str, object] = {}
        reader = threading.Thread(target=stream_sse, daemon=True, args=(
            lab, "Count from 1 to 100, one number per line, nothing else.", 80, ended, short))

        def start_stream(line: str) -> None:
            # The services role's first task, ~7 s before the handler: the stream (80
            # tokens, 2-5 tokens/s here) is running when the coordinator is told to stop.
            if line.startswith("TASK [services : Check the service settings]") \
                    and reader.ident is None:
                reader.start()

        drained = lab.playbook(
            "--tags", "services", "-e",
            json.dumps({"services_worker_env": env, "specshard_drain_timeout": 12}),
            log_name="coordinator", on_line=start_stream)
        assert reader.ident is not None, "the playbook never reached the services role"
        reader.join(300)
        assert not reader.is_alive(), "the stream did not end"
        lab.wait_serving(120)
        answer3 = lab.ask("What is the capital of France? Answer in one word.")
        serve_after = main_pid(box1, "specshard-serve")
    drains = box1.ssh("journalctl -u specshard-serve --no-pager -o cat | grep 'draining:' "
                      "| tail -n 1", check=False).stdout.strip()
    handler = [at for at, line in drained.lines_at if "Restart the coordinator" in line]
    shown = "".join(piece for _, piece in short)
    lab.report.append(
        f"coordinator restart: pid {serve_pid} -> {serve_after}; the stream ran "
        f"{(short[-1][0] - short[0][0]) if short else 0:.0f} s, {len(short)} chunks, finish "
        f"{ended.get('finish')}, [DONE] {bool(ended.get('done'))}, error {ended.get('error')};"
        f" handler started {(handler[0] - short[0][0]) if handler and short else 0:.0f} s "
        f"into the stream; journal: {drains!r}; its last line: "
        f"{shown.strip().splitlines()[-1] if shown.strip() else ''!r}; then {answer3!r}")
    assert handler, drained.stdout[-4000:]
    assert ended.get("status") == 200 and "error" not in ended, ended
    assert ended.get("finish") in ("stop", "length", "abort") and ended.get("done"), ended
    # It was streaming when the handler began, and the coordinator drained it (not 0).
    assert short and short[0][0] < handler[0], (short[:3], handler)
    assert re.search(r"draining: [1-9]\d* request", drains), drains
    assert serve_after != serve_pid and serve_after > 0
    assert {n: main_pid(b, "specshard-worker@0") for n, b in lab.boxes.items()} == worker_pids
    assert "paris" in answer3.lower()

    with step("reboot box2 and recover", t):
        boots = box2.boots
        box2.ssh("systemctl reboot", check=False, timeout=30)
        deadline = time.monotonic() + 120
        while box2.boots == boots and time.monotonic() < deadline:
            time.sleep(0.5)
        assert box2.boots == boots + 1, "box2 did not come back from its reboot"
        box2.wait_ssh(120)
        lab.wait_serving(300)
        answer2 = lab.ask("What is the capital of France? Answer in one word.")
    info = lab.cluster()
    lab.report.append(f"after box2's reboot: answer {answer2!r}, ring restarts "
                      f"{info.get('restarts')}")
    assert "paris" in answer2.lower()

    # The journal under systemd holds the INFO lines (SPECSHARD_LOG_LEVEL=info): each
    # worker's load progress (coordinator/ring/grpc_ring.py: "<worker> layers A-B: <phase>
    # …") and the ring's events (coordinator/engine/core.py: lost, rebuilt, replayed).
    journal = box1.ssh("journalctl -u specshard-serve --no-pager -o cat",
                       check=False).stdout
    (lab.work / "coordinator-journal.log").write_text(journal)
    phases = set(re.findall(r":\d+ layers \d+-\d+: (cut|load|connect|ready) ", journal))
    rebuilt = re.findall(r"ring rebuilt after \d+ attempt\(s\); \d+ sequences replayed",
                         journal)
    lab.report.append(f"coordinator journal: load phases {sorted(phases)}, "
                      f"{journal.count('ring lost (')} 'ring lost', {len(rebuilt)} 'ring "
                      f"rebuilt', {journal.count('draining:')} 'draining' lines")
    lab.report.append("coordinator journal (last lines):\n"
                      + "\n".join(journal.splitlines()[-30:]))
    assert {"load", "ready"} <= phases, journal[-3000:]
    assert "ring lost (" in journal and len(rebuilt) >= 2, journal[-3000:]
