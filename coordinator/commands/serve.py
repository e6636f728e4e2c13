"""`specshard serve` (the OpenAI-compatible service) and `specshard demo` (`make run`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from cluster import models
from cluster.auth import is_loopback
from cluster.errors import SpecshardError
from cluster.gguf_file import read_header
from cluster.planning.cli import render
from coordinator.api.app import ServerState, create_app
from coordinator.api.sampling_defaults import from_settings
from coordinator.api.server import ServerThread
from coordinator.api.templates import ChatOptions, chat_options
from coordinator.commands.demo_edit import run_edit_demo
from coordinator.engine.frontend import Generation
from coordinator.engine.request import GenerationRequest
from coordinator.service import RunningCluster, start_cluster
from coordinator.settings import ServeSettings, add_arguments, from_args

log = logging.getLogger(__name__)
DEMO_PROMPT = "Write a Python function that checks whether a string is a palindrome."


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    add_arguments(p)
    p.set_defaults(handler=run_serve)
    d = sub.add_parser("demo", help="a local 2-worker Ray cluster on the demo pair, one "
                                    "streamed answer, its speed and the plan")
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--max-tokens", type=int, default=160)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--no-draft", action="store_true", help="plain decoding, no draft model")
    d.add_argument("--serve", action="store_true", help="then keep the API up")
    d.add_argument("--port", type=int, default=8000)
    d.set_defaults(handler=run_demo)


def api_key_of(s: ServeSettings) -> str | None:
    if s.api_key_file:
        try:
            key = Path(s.api_key_file).read_text().strip()
        except OSError as exc:
            raise SpecshardError(f"cannot read {s.api_key_file}: {exc.strerror}") from exc
        return key or None
    return s.api_key


def wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def drain(state: ServerState, cluster: RunningCluster, timeout_s: float) -> None:
    """Stop admitting (503), give running requests `timeout_s` to finish, end the rest
    with finish_reason "abort", and wait until every event stream has sent its end."""
    state.draining = True
    running = cluster.engine.outstanding
    log.info("draining: %d request(s) get %.0f s to finish", running, timeout_s)
    cluster.engine.drain(timeout_s)
    deadline = time.monotonic() + 10.0
    while state.open_streams and time.monotonic() < deadline:
        time.sleep(0.05)


def server_state(s: ServeSettings, key: str | None, chat: ChatOptions, model: Path
                 ) -> ServerState:
    """What the API serves from `serve`'s settings, before the ring is up (the engine is
    set once it is)."""
    header = read_header(model)
    # /props tells clients the template their messages are rendered with: the file's
    # when --chat-template-file replaces the model's.
    template = chat.template.source if chat.template is not None else str(
        header.values.get("tokenizer.chat_template", ""))
    return ServerState(engine=None, api_key=key, chat=chat, model_names=tuple(s.alias),
                       sampling=from_settings(s, header),
                       strict_model_name=s.strict_model_name,
                       props={"model_path": str(model), "chat_template": template})


def run_serve(args: argparse.Namespace) -> int:
    s = from_args(args)
    key = api_key_of(s)
    if not key and not is_loopback(s.host):
        raise SpecshardError(f"serving on {s.host} (not loopback) needs an API key: "
                             "SPECSHARD_API_KEY or --api-key-file")
    # A bad template or reasoning setting is refused before anything loads.
    chat = chat_options(s.reasoning_format, s.reasoning_budget, s.chat_template_file)
    model = models.resolve(s.model)
    state = server_state(s, key, chat, model)
    cluster: RunningCluster | None = None
    try:
        # The API answers from the start: /health is 503 until the ring is loaded.
        with ServerThread(create_app(state), host=s.host, port=s.port) as server:
            print(f"specshard: loading; API at {server.url}/v1", file=sys.stderr)
            cluster = start_cluster(s, progress=sys.stderr.isatty())
            state.cluster_info = cluster.describe
            state.engine = cluster.engine
            print(f"specshard: serving {cluster.engine.model_name} at {server.url}/v1",
                  file=sys.stderr)
            wait_for_signal()
            drain(state, cluster, s.drain_timeout)
    finally:  # the HTTP side is closed: end what still runs, then the ring
        if cluster is not None:
            cluster.close()
    log.info("stopped")
    return 0


def stream_answer(cluster: RunningCluster, prompt: str, max_tokens: int) -> Generation:
    engine = cluster.engine
    tokens = engine.tokenizer.encode(engine.tokenizer.chat_prompt(
        [{"role": "user", "content": prompt}]))

    def echo(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    return engine.generate(GenerationRequest(tokens, max_tokens), echo)


def run_demo(args: argparse.Namespace) -> int:
    s = ServeSettings(model="demo", draft=None if args.no_draft else "demo",
                      local_workers=args.workers, ctx=4096, parallel=1, port=args.port)
    print(f"specshard demo: starting a local Ray cluster with {args.workers} workers "
          "(first run: the demo models are fetched, ~1.6 GB)…", file=sys.stderr)
    t0 = time.perf_counter()
    cluster = start_cluster(s, progress=sys.stderr.isatty())
    try:
        print(f"ready in {time.perf_counter() - t0:.1f} s\n\n> {args.prompt}\n")
        done = stream_answer(cluster, args.prompt, args.max_tokens)
        st = done.stats.as_dict()
        print(f"\n\n{len(done.tokens)} tokens · {st['tok_s']} tok/s decode · "
              f"{st['prompt_tok_s']} tok/s prompt · {st['tokens_per_step']} tokens per "
              f"pipeline step (γ mean {st['gamma_mean']})\n")
        run_edit_demo(cluster, None if args.no_draft else done.stats)
        if cluster.built.plan is not None:
            print("\n" + render(cluster.built.plan, cluster.engine.model_name,
                                None if args.no_draft else "demo draft (runs in the "
                                "coordinator)"))
        if args.serve:
            state = ServerState(engine=cluster.engine, api_key=None,
                                cluster_info=cluster.describe)
            with ServerThread(create_app(state), host="127.0.0.1", port=args.port) as server:
                print(f"\nOpenAI-compatible API at {server.url}/v1 — Ctrl-C to stop")
                wait_for_signal()
                drain(state, cluster, s.drain_timeout)
    finally:
        cluster.close()
    return 0
