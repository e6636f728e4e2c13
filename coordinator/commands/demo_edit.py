"""The demo's second part: speculation where it pays on a CPU box.

After the chat answer, `make run` asks for an edit of given code — an answer that mostly
copies its prompt — once by plain decoding and once with n-gram drafting and run-ahead
windows, on the same ring, and prints the tokens per step and the speed of both. Then one
line says whether the draft model proposed anything on this machine, and why.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from coordinator.engine.frontend import Engine
from coordinator.engine.request import GenerationRequest, Stats
from coordinator.service import EngineOptions, RunningCluster, start_engine
from coordinator.speculation.drafting import Drafter
from coordinator.speculation.gamma import GammaConfig
from coordinator.speculation.ngram import NgramDrafter

EDIT_PROMPT = """Rename the function `area` to `rect_area` in this code and print the \
whole file again, changing nothing else:

```python
def area(width, height):
    \"\"\"Area of a rectangle.\"\"\"
    return width * height


def perimeter(width, height):
    return 2 * (width + height)


def describe(width, height):
    a = area(width, height)
    p = perimeter(width, height)
    return f"{width}x{height}: area {a}, perimeter {p}"
```"""
EDIT_TOKENS = 120


def _borrowed(cluster: RunningCluster, drafter: Drafter | None) -> Engine:
    """Another engine on the cluster's ring and measured costs, for one comparison (an
    n-gram guess costs nothing to draft, where the draft model's were measured)."""
    costs = replace(cluster.engine.core.policy.costs, draft=0.0)
    return start_engine(cluster.built, cluster.engine.tokenizer, cluster.engine.model_name,
                        drafter, EngineOptions(gamma=GammaConfig()), costs=costs)


def _edit(engine: Engine) -> Stats:
    tokens = engine.tokenizer.encode(engine.tokenizer.chat_prompt(
        [{"role": "user", "content": EDIT_PROMPT}]))
    # The same length both ways (past the end token too): the speeds compare like for like.
    return engine.generate(GenerationRequest(tokens, EDIT_TOKENS, ignore_eos=True)).stats


def run_edit_demo(cluster: RunningCluster, draft_stats: Stats | None) -> dict[str, Stats]:
    """Plain decoding against n-gram drafting with run-ahead, on an edit; the ring goes
    back to the cluster's engine afterwards. Returns each run's stats by label."""
    print("> the same ring, asked for an edit of given code (its answer copies the prompt):",
          flush=True)
    rates: dict[str, Stats] = {}
    try:
        for label, drafter in (("plain decoding", None),
                               ("n-gram drafting, run-ahead", NgramDrafter())):
            engine = _borrowed(cluster, drafter)
            try:
                rates[label] = _edit(engine)
            finally:
                engine.close()
    finally:
        cluster.engine.core.reconnect()
    plain, spec = rates.values()
    for label, st in rates.items():
        ahead = f", {st.ahead_windows} windows run ahead ({st.stale_windows} stale, " \
            f"{st.skipped_windows} of them skipped by the last worker)" if st.ahead_windows else ""
        print(f"  {label:<28} {st.tok_s:6.2f} tok/s · {st.tokens_per_step:.2f} tokens per "
              f"target step{ahead}")
    if plain.tok_s > 0:
        print(f"  speculation here: {spec.tok_s / plain.tok_s:.2f}× plain decoding")
    if draft_stats is not None:
        print(draft_line(cluster, draft_stats))
    sys.stdout.flush()
    return rates


def draft_line(cluster: RunningCluster, stats: Stats) -> str:
    """Why the draft model did (or did not) propose guesses in the chat answer."""
    costs = cluster.engine.core.policy.costs
    guesses = sum(stats.proposed)
    if guesses > stats.steps // 4:
        return (f"  the draft model proposed {guesses} guesses in the chat answer "
                f"({sum(stats.accepted)} accepted)")
    probes = f" (but for {guesses} probe guesses)" if guesses else ""
    return (f"  the draft model stayed off in the chat answer{probes}: on this CPU a draft token "
            f"costs {1000 * costs.draft:.0f} ms and each extra verified row "
            f"{1000 * costs.verify_b:.0f} ms, more than its guesses save (on a GPU a row "
            f"costs almost nothing: `specshard bench spec --profile 2x4070`)")
