// The specshard status page: reads /health, /v1/status/events, /v1/cluster and /metrics
// every REFRESH_MS and draws them. No framework, no build step. Everything a server sends
// is written as text (textContent), never as HTML.
"use strict";

const REFRESH_MS = 2000;
const KEY_STORE = "specshard.apiKey";
const GIB = 1024 ** 3;

const $ = (id) => document.getElementById(id);
let lastSeq = 0;
let previous = null;  // {t, metrics}: the last scrape, for rates over the refresh interval
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function show(id, visible) { $(id).hidden = !visible; }

function fmt(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toFixed(digits);
}

function gib(bytes) { return bytes === null || bytes === undefined ? "–" : fmt(bytes / GIB, 2); }

// --- talking to the server ----------------------------------------------------------------

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

async function api(path) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  const reply = await fetch(path, {headers, cache: "no-store"});
  if (reply.status === 401) {
    const err = new Error("unauthorized");
    err.unauthorized = true;
    throw err;
  }
  if (!reply.ok) {
    const err = new Error(path + ": HTTP " + reply.status);
    err.status = reply.status;
    throw err;
  }
  return reply.json();
}

// Prometheus' text format: `name{a="b",c="d"} value` per line, comments start with #.
function parseMetrics(text) {
  const out = new Map();
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const pair of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    }
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({labels, value: Number(m[4])});
  }
  return out;
}

function value(metrics, name, match = {}) {
  for (const s of metrics.get(name) || []) {
    if (Object.entries(match).every(([k, v]) => s.labels[k] === v)) return s.value;
  }
  return null;
}

function sum(metrics, name) {
  const series = metrics.get(name);
  return series ? series.reduce((a, s) => a + s.value, 0) : null;
}

// Mean of a histogram over the last refresh interval when it moved, else over all time.
function histMean(now, before, name, match = {}) {
  const s = value(now, name + "_sum", match), c = value(now, name + "_count", match);
  if (s === null || !c) return null;
  if (before) {
    const s0 = value(before, name + "_sum", match), c0 = value(before, name + "_count", match);
    if (c0 !== null && c > c0) return (s - s0) / (c - c0);
  }
  return s / c;
}

// --- drawing ------------------------------------------------------------------------------

function setState(state, text) {
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = text;
}

function tile(label, big, small, id) {
  return el("div", {class: "tile", "data-metric": id},
    el("div", {class: "label"}, label),
    el("div", {class: "big"}, big),
    el("div", {class: "small muted"}, small || ""));
}

function drawNumbers(cluster, m, before, dt) {
  const tiles = [];
  const gen = value(m, "specshard_generated_tokens_total");
  let live = null;
  if (before && dt > 0) {
    const gen0 = value(before, "specshard_generated_tokens_total");
    if (gen !== null && gen0 !== null) live = (gen - gen0) / dt;
  }
  tiles.push(tile("tokens/s now", fmt(live, 1),
                  "last request " + fmt(value(m, "specshard_decode_tokens_per_second"), 1) +
                  " tok/s decode", "tok_s"));
  tiles.push(tile("tokens per step", fmt(value(m, "specshard_tokens_per_step"), 2),
                  "last request, per trip down the ring", "tokens_per_step"));
  const acc = (m.get("specshard_draft_acceptance") || [])
    .map((s) => [Number(s.labels.position), s.value]).sort((a, b) => a[0] - b[0]);
  tiles.push(tile("draft acceptance",
                  acc.length ? fmt(100 * acc[0][1], 0) + "%" : "–",
                  acc.length ? acc.slice(0, 6).map(([p, v]) => "#" + p + " " + fmt(100 * v, 0) + "%")
                    .join(" · ") : "no draft guesses yet", "acceptance"));
  const running = value(m, "specshard_sequences_running");
  tiles.push(tile("slots in use", (running === null ? "–" : fmt(running, 0)) + " / " +
                  (cluster.parallel ?? "–"),
                  "free " + fmt(value(m, "specshard_sequence_slots_free"), 0) + " · KV holds " +
                  fmt(value(m, "specshard_kv_tokens"), 0) + " tokens", "slots"));
  tiles.push(tile("queue", fmt(value(m, "specshard_queue_depth"), 0),
                  "requests waiting for a slot", "queue"));
  tiles.push(tile("hop latency", fmt(histMean(m, before, "specshard_hop_ms"), 2) + " ms",
                  "batch time not computing, per hop", "hop_ms"));
  tiles.push(tile("time to first token",
                  fmt(histMean(m, null, "specshard_time_to_first_token_seconds"), 2) + " s",
                  "mean since start", "ttft"));
  const outcomes = (m.get("specshard_requests_total") || [])
    .map((s) => s.labels.outcome + " " + fmt(s.value, 0)).join(" · ");
  tiles.push(tile("requests", fmt(sum(m, "specshard_requests_total") ?? 0, 0),
                  outcomes || "none yet", "requests"));
  tiles.push(tile("ring restarts", fmt(value(m, "specshard_worker_restarts_total") ?? 0, 0),
                  "rebuilds after a lost worker (replayed)", "restarts"));
  $("numbers").replaceChildren(...tiles);
}

function stageMs(m, before, node, i) {
  // The engine labels per-worker compute by the worker's name: try what a node may be called.
  for (const label of [node.address, String(i), "w" + i, "worker" + i]) {
    const v = histMean(m, before, "specshard_stage_ms", {worker: label});
    if (v !== null) return v;
  }
  const series = (m.get("specshard_stage_ms_count") || []).map((s) => s.labels.worker);
  if (series.length > i) return histMean(m, before, "specshard_stage_ms", {worker: series[i]});
  return null;
}

function gpuLine(g) {
  const used = g.total_bytes - g.free_bytes;
  const pct = g.total_bytes ? Math.round(100 * used / g.total_bytes) : 0;
  return el("div", {class: "gpu"},
    el("div", {}, "GPU " + g.index + " · " + g.name),
    el("div", {class: "bar", title: pct + "% in use"}, el("span", {style: "width:" + pct + "%"})),
    el("div", {class: "small muted"}, gib(used) + " / " + gib(g.total_bytes) + " GiB in use at load"));
}

function drawRing(cluster, m, before) {
  const plan = cluster.plan || {};
  const planNodes = plan.nodes || [];
  const hop = histMean(m, before, "specshard_hop_ms");
  const cards = [];
  const draft = plan.draft;
  cards.push(el("div", {class: "card coordinator"},
    el("div", {class: "title"}, "coordinator"),
    el("div", {}, cluster.model || ""),
    el("div", {class: "small muted"},
       "ctx " + (cluster.n_ctx ?? "–") + " · parallel " + (cluster.parallel ?? "–") +
       " · micro-batches " + (cluster.micro_batches ?? "–")),
    el("div", {class: "small muted"},
       draft ? "draft planned on " + draft.node + " (" + gib(draft.total_bytes) + " GiB)"
             : "draft: " + (cluster.costs && cluster.costs.draft_ms ? "in the coordinator" : "none"))));
  (cluster.nodes || []).forEach((node, i) => {
    cards.push(el("div", {class: "hop"}, "→ " + (hop === null ? "" : fmt(hop, 2) + " ms")));
    const st = node.stage || {};
    const p = planNodes[i] || {};
    const layers = st.begin !== undefined ? st.begin + ":" + st.end
                 : (p.layers ? p.layers[0] + ":" + p.layers[1] : "–");
    const kv = (st.type_k || p.type_k || "?") + "/" + (st.type_v || p.type_v || "?") +
               ((st.flash_attn ?? p.flash_attn) ? " FA" : "");
    const healthy = node.healthy === true ? "up" : node.healthy === false ? "down" : "unknown";
    const gpus = (node.gpus || []).map(gpuLine);
    const ms = stageMs(m, before, node, i);
    cards.push(el("div", {class: "card worker", "data-node": String(i)},
      el("div", {class: "title"},
         el("span", {class: "dot", "data-health": healthy, title: healthy}),
         "worker " + i + (node.hostname ? " · " + node.hostname : "")),
      el("div", {class: "small muted"}, node.address + (node.pid ? " · pid " + node.pid : "")),
      el("div", {class: "kv"},
         el("span", {}, "layers ", el("b", {class: "layers"}, layers)),
         el("span", {}, "KV ", el("b", {}, kv))),
      el("div", {class: "kv"},
         el("span", {}, "compute ", el("b", {class: "stage-ms"}, fmt(ms, 1) + " ms"), " / batch")),
      p.total_bytes !== undefined ? el("div", {class: "small muted"},
         "plan: " + gib(p.weights_bytes) + " weights + " + gib(p.kv_bytes) + " KV + " +
         gib(p.compute_bytes) + " compute of " + gib(p.capacity_bytes) + " GiB") : null,
      gpus.length ? gpus : el("div", {class: "small muted"},
         "CPU" + (node.gpu_note ? " — " + node.gpu_note : ""))));
  });
  if ((cluster.nodes || []).length) {
    cards.push(el("div", {class: "hop"}, "↩ " + (hop === null ? "" : fmt(hop, 2) + " ms")));
  }
  $("ring").replaceChildren(...cards);
}

function drawPlan(cluster) {
  const plan = cluster.plan;
  show("plan-section", !!plan);
  if (!plan) return;
  $("plan-summary").textContent =
    (plan.feasible ? "fits" : "does not fit: " + (plan.reason || "")) + " at " + plan.ctx +
    " tokens × " + plan.parallel + " sequences; up to " + plan.max_ctx + " tokens · f16 KV on " +
    plan.f16_layers + " layers";
  const head = el("tr", {}, ["node", "layers", "KV", "weights", "KV cache", "compute",
    "draft", "total", "capacity", "max ctx", "ms/token"].map((h) => el("th", {}, h)));
  const rows = (plan.nodes || []).map((n) => el("tr", {},
    el("td", {}, n.name), el("td", {}, n.layers[0] + ":" + n.layers[1]),
    el("td", {}, n.type_k + (n.flash_attn ? " FA" : "")),
    el("td", {}, gib(n.weights_bytes)), el("td", {}, gib(n.kv_bytes)),
    el("td", {}, gib(n.compute_bytes)), el("td", {}, gib(n.draft_bytes)),
    el("td", {}, gib(n.total_bytes)), el("td", {}, gib(n.capacity_bytes)),
    el("td", {}, n.max_ctx), el("td", {}, fmt(n.token_ms, 1))));
  $("plan").replaceChildren(el("thead", {}, head), el("tbody", {}, rows));
}

function drawEvents(events) {
  if (!events.length) return;
  const list = $("events");
  for (const e of events) {
    lastSeq = Math.max(lastSeq, e.seq);
    const t = new Date(e.time * 1000).toLocaleTimeString();
    list.prepend(el("li", {"data-level": e.level},
      el("span", {class: "muted"}, t + " "), el("span", {class: "level"}, e.level + " "),
      e.message));
  }
  while (list.children.length > 100) list.lastChild.remove();
  show("events-section", true);
}

// --- the loop -----------------------------------------------------------------------------

async function refresh() {
  let ready = false;
  try {
    const health = await fetch("/health", {cache: "no-store"});
    ready = health.ok;
    setState(ready ? "ok" : "loading", ready ? "serving" : "loading");
  } catch (e) {
    setState("down", "unreachable");
    return;
  }
  show("loading", !ready);
  try {
    const ev = await api("/v1/status/events?after=" + lastSeq);
    show("key-form", false);
    $("forget").hidden = !apiKey();
    drawEvents(ev.events);
    if (!ready) {
      for (const id of ["numbers-section", "ring-section", "plan-section"]) show(id, false);
      return;
    }
    const [cluster, text] = await Promise.all([
      api("/v1/cluster"),
      fetch("/metrics", {cache: "no-store"}).then((r) => r.ok ? r.text() : ""),
    ]);
    const m = parseMetrics(text);
    const t = performance.now();
    const dt = previous ? (t - previous.t) / 1000 : 0;
    const before = previous ? previous.metrics : null;
    $("model").textContent = cluster.model || "";
    drawNumbers(cluster, m, before, dt);
    drawRing(cluster, m, before);
    drawPlan(cluster);
    previous = {t, metrics: m};
    for (const id of ["numbers-section", "ring-section"]) show(id, true);
    show("error", false);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    if (e.unauthorized) {
      show("key-form", true);
      if (apiKey()) {
        $("key-error").textContent = "That key was refused.";
        show("key-error", true);
      }
      for (const id of ["numbers-section", "ring-section", "plan-section"]) show(id, false);
      return;
    }
    $("error").textContent = String(e.message || e);
    show("error", true);
  }
}

function schedule() {
  clearTimeout(timer);
  timer = setTimeout(async () => {
    if (!document.hidden) await refresh();
    schedule();
  }, REFRESH_MS);
}

$("key-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  localStorage.setItem(KEY_STORE, $("key").value.trim());
  $("key").value = "";
  show("key-error", false);
  await refresh();
});

$("forget").addEventListener("click", async () => {
  localStorage.removeItem(KEY_STORE);
  await refresh();
});

document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });

refresh().then(schedule);
