// exo-node web page: a streaming chat against /v1/chat/completions and a live picture of /v1/cluster.
// Plain JS, no dependencies, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;
const PALETTE = ["#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#ec4899", "#84cc16"];

const state = {
  model: null,        // first id from /v1/models
  history: [],        // [{role, content}] sent with every request
  controller: null,   // AbortController of the running generation
  lastCluster: "",    // JSON of the last drawn /v1/cluster, to redraw only on change
  clusterData: null,  // ...and the object itself, to redraw when the panel is resized
};

// ---------------------------------------------------------------- API access

// A node started with --api-key wants "Authorization: Bearer KEY": asked for once, kept in this browser.
async function api(path, init = {}) {
  const send = () => fetch(path, { ...init, headers: { ...(init.headers || {}),
    ...(localStorage.exoApiKey ? { Authorization: `Bearer ${localStorage.exoApiKey}` } : {}) } });
  const r = await send();
  if (r.status !== 401) return r;
  const key = window.prompt("This cluster needs an API key:");
  if (!key) return r;
  localStorage.exoApiKey = key;
  return send();
}

// ---------------------------------------------------------------- model

async function loadModel() {
  try {
    const r = await api("/v1/models", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const body = await r.json();
    const first = body && Array.isArray(body.data) && body.data[0];
    if (!first || !first.id) throw new Error("no model listed");
    state.model = first.id;
    $("model-name").textContent = first.id;
    if (Number.isFinite(first.n_layers)) $("model-layers").textContent = `${first.n_layers} layers`;
    return first.id;
  } catch (e) {
    $("model-name").textContent = "unavailable";
    throw new Error(`cannot list models: ${e.message}`);
  }
}

// ---------------------------------------------------------------- chat

function scrollToBottom(force) {
  const box = $("messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  if (force || near) box.scrollTop = box.scrollHeight;
}

function addBubble(role, text) {
  const empty = $("empty");
  if (empty) empty.remove();
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "content";
  body.textContent = text || "";
  el.appendChild(body);
  $("messages").appendChild(el);
  scrollToBottom(true);
  return el;
}

function bubbleNote(el, cls, text) {
  const note = document.createElement("div");
  note.className = cls;
  note.textContent = text;
  el.appendChild(note);
  scrollToBottom(false);
}

function setGenerating(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  document.body.classList.toggle("generating", on);
}

function readSettings() {
  let maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isFinite(maxTokens) || maxTokens < 1) maxTokens = 128;
  let temperature = parseFloat($("temperature").value);
  if (!Number.isFinite(temperature) || temperature < 0) temperature = 0.7;
  return { maxTokens, temperature };
}

async function errorFromResponse(r) {
  let msg = `HTTP ${r.status} ${r.statusText || ""}`.trim();
  try {
    const text = await r.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) msg = `${msg}: ${body.error.message}`;
      else if (text) msg = `${msg}: ${text.slice(0, 300)}`;
    } catch { if (text) msg = `${msg}: ${text.slice(0, 300)}`; }
  } catch { /* body unreadable */ }
  return new Error(msg);
}

// Reads an SSE body line by line and calls onData(payload) for each `data:` line until `[DONE]`.
async function readSSE(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, "");
      buf = buf.slice(nl + 1);
      if (!line.startsWith("data:")) continue;   // blank separators, comments, event:/id: fields
      const payload = line.slice(5).trim();
      if (payload === "[DONE]") { reader.cancel().catch(() => {}); return true; }
      if (!payload) continue;
      try { onData(payload); } catch (e) { reader.cancel().catch(() => {}); throw e; }
    }
  }
  buf += decoder.decode();
  const tail = buf.replace(/\r$/, "");
  if (tail.startsWith("data:")) {
    const payload = tail.slice(5).trim();
    if (payload === "[DONE]") return true;
    if (payload) onData(payload);
  }
  return false;   // the stream ended without [DONE]
}

async function send() {
  const promptEl = $("prompt");
  const text = promptEl.value.trim();
  if (!text || state.controller) return;
  promptEl.value = "";

  addBubble("user", text);
  state.history.push({ role: "user", content: text });
  const bubble = addBubble("assistant", "");
  bubble.classList.add("pending");
  const content = bubble.querySelector(".content");

  const controller = new AbortController();
  state.controller = controller;
  setGenerating(true);

  const { maxTokens, temperature } = readSettings();
  let answer = "", tokens = 0, firstAt = 0, finish = null, failed = false;
  const started = performance.now();
  const append = (piece) => {
    if (!firstAt) { firstAt = performance.now(); bubble.classList.remove("pending"); }
    answer += piece;
    tokens += 1;
    content.textContent = answer.replace(/^\s+/, "");   // models often open with a space
    scrollToBottom(false);
  };

  try {
    const model = state.model || await loadModel();
    const r = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify({ model, messages: state.history, stream: true, max_tokens: maxTokens, temperature }),
      signal: controller.signal,
    });
    if (!r.ok) throw await errorFromResponse(r);
    if (!r.body) throw new Error("the response has no body to stream");
    const sawDone = await readSSE(r.body, (payload) => {
      let obj;
      try { obj = JSON.parse(payload); } catch { return; }
      if (obj && obj.error) throw new Error(obj.error.message || JSON.stringify(obj.error));
      const choice = obj && Array.isArray(obj.choices) ? obj.choices[0] : null;
      if (!choice) return;
      const piece = choice.delta && choice.delta.content;
      if (piece) append(piece);
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (!sawDone && !finish) throw new Error("the stream ended early");
  } catch (e) {
    failed = true;
    bubble.classList.remove("pending");
    if (e.name === "AbortError") bubbleNote(bubble, "stopped", "stopped");
    else { bubble.classList.add("error"); bubbleNote(bubble, "error-text", `Error: ${e.message}`); }
  } finally {
    state.controller = null;
    bubble.classList.remove("pending");
    if (answer) state.history.push({ role: "assistant", content: answer });
    else if (!failed) content.textContent = "(empty reply)";
    if (!answer && failed) state.history.pop();   // drop the unanswered question so a retry starts clean
    if (tokens) {
      const now = performance.now();
      const ttft = (firstAt - started) / 1000;
      const rate = tokens > 1 && now > firstAt ? (tokens - 1) / ((now - firstAt) / 1000) : null;
      const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`, `first after ${ttft.toFixed(2)} s`];
      if (rate) parts.push(`${rate.toFixed(1)} tok/s`);
      if (finish) parts.push(`finish: ${finish}`);
      bubbleNote(bubble, "meta", parts.join(" · "));
    }
    setGenerating(false);
    promptEl.focus();
  }
}

function clearChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  const box = $("messages");
  box.replaceChildren();
  const empty = document.createElement("div");
  empty.id = "empty";
  empty.className = "empty";
  empty.textContent = "New conversation. Ask something.";
  box.appendChild(empty);
  $("prompt").focus();
}

// ---------------------------------------------------------------- cluster picture

function svg(tag, attrs, parent, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  if (parent) parent.appendChild(el);
  return el;
}

function clip(s, n) { s = String(s ?? ""); return s.length > n ? s.slice(0, n - 1) + "…" : s; }

function gb(bytes) {
  if (!Number.isFinite(bytes) || bytes <= 0) return "? GB";
  const g = bytes / 1e9;
  return `${g >= 100 ? g.toFixed(0) : g.toFixed(1)} GB`;
}

function range(start, end) { return end - start <= 1 ? `${start}` : `${start}–${end - 1}`; }

// How many cards fit side by side in the panel at no less than ~3/4 scale.
function columnsFor(n) {
  const wrap = $("cluster").parentElement;
  const avail = Math.max(300, (wrap ? wrap.clientWidth : 600) || 600);
  const fit = Math.floor((avail / 0.75 - 2 * 24 - 2 * 16 + 48) / (184 + 48));
  return Math.max(1, Math.min(n || 1, fit));
}

function drawCluster(c) {
  const root = $("cluster");
  root.replaceChildren();
  const nodes = Array.isArray(c.nodes) ? c.nodes : [];
  const plan = Array.isArray(c.plan) ? c.plan : [];
  const nLayers = Number.isFinite(c.n_layers) ? c.n_layers : 0;
  const byId = new Map(nodes.map((n) => [n.id, n]));

  // Order: the pipeline order of the plan, then nodes that hold no layers.
  const order = [];
  for (const s of plan) if (!order.includes(s.node_id)) order.push(s.node_id);
  for (const n of [...nodes].sort((a, b) => String(a.id).localeCompare(String(b.id)))) if (!order.includes(n.id)) order.push(n.id);
  // Colour per node: its place among all ids sorted, so it does not change when the plan reorders.
  const ids = [...order].sort((a, b) => String(a).localeCompare(String(b)));
  const colour = (id) => PALETTE[ids.indexOf(id) % PALETTE.length];
  const ranges = new Map(plan.map((s) => [s.node_id, [s.start, s.end]]));

  // Cards left to right, wrapping into rows when the panel is too narrow to show them all at a readable size.
  const W = 184, H = 112, GAP = 48, ROWGAP = 44, PAD = 24, TOP = 64, LANE = 16;
  const cols = columnsFor(order.length);
  const rows = Math.max(1, Math.ceil(order.length / cols));
  const cardsW = cols * W + (cols - 1) * GAP;
  const width = Math.max(PAD * 2 + cardsW + (rows > 1 ? 2 * LANE : 0), 440);
  const x0 = (width - cardsW) / 2;
  const cardX = (i) => x0 + (i % cols) * (W + GAP);
  const cardY = (i) => TOP + Math.floor(i / cols) * (H + ROWGAP);
  const barY = TOP + rows * H + (rows - 1) * ROWGAP + 34, barH = 28, height = barY + barH + 48;
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);

  const defs = svg("defs", {}, root);
  const marker = svg("marker", { id: "arrowhead", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
  svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#64748b" }, marker);

  svg("text", { x: PAD, y: 22, class: "title" }, root, `${c.model || "?"}`);
  svg("text", { x: width - PAD, y: 22, class: "subtitle", "text-anchor": "end" }, root,
      `${nLayers} layers · ${nodes.length} node${nodes.length === 1 ? "" : "s"}`);

  // Pipeline arrows between consecutive plan stages, then the return arrow from the last stage to the first.
  const inPlan = plan.map((s) => order.indexOf(s.node_id));
  const arrows = svg("g", { class: "arrows" }, root);
  const path = (pts) => pts.map(([x, y], k) => `${k ? "L" : "M"}${x},${y}`).join(" ");
  for (let k = 0; k + 1 < inPlan.length; k++) {
    const a = inPlan[k], b = inPlan[k + 1];
    let d;
    if (cardY(a) === cardY(b)) {
      const y = cardY(a) + H / 2;
      d = a < b ? path([[cardX(a) + W + 3, y], [cardX(b) - 3, y]]) : path([[cardX(a) - 3, y], [cardX(b) + W + 3, y]]);
    } else {  // onto the next row: down into the gap above it, across, down into the card
      const xa = cardX(a) + W / 2, xb = cardX(b) + W / 2, yGap = cardY(b) - ROWGAP / 2;
      d = path([[xa, cardY(a) + H + 3], [xa, yGap], [xb, yGap], [xb, cardY(b) - 3]]);
    }
    svg("path", { d, class: "arrow", "marker-end": "url(#arrowhead)" }, arrows);
  }
  if (inPlan.length >= 1) {
    const first = inPlan[0], last = inPlan[inPlan.length - 1], yTop = TOP - 22;
    const xf = cardX(first) + W * (inPlan.length === 1 ? 0.3 : 0.5);
    let d;
    if (cardY(last) === cardY(first)) {  // over the top of the row
      const xl = cardX(last) + W * (inPlan.length === 1 ? 0.7 : 0.5);
      d = path([[xl, TOP - 3], [xl, yTop], [xf, yTop], [xf, TOP - 3]]);
    } else {  // out of the bottom of the last card, right under its row, up a lane right of all cards, over the top
      const xl = cardX(last) + W / 2, yb = cardY(last) + H + 14, xLane = x0 + cardsW + LANE;
      d = path([[xl, cardY(last) + H + 3], [xl, yb], [xLane, yb], [xLane, yTop], [xf, yTop], [xf, TOP - 3]]);
    }
    svg("path", { d, class: "arrow return", "marker-end": "url(#arrowhead)" }, arrows);
    const xl = cardY(last) === cardY(first) ? cardX(last) + W / 2 : x0 + cardsW;
    svg("text", { x: (xl + xf) / 2, y: yTop - 5, class: "arrow-label", "text-anchor": "middle" }, arrows, "next token");
  }

  // Node cards.
  order.forEach((id, i) => {
    const n = byId.get(id) || { id, healthy: false, device: "not reachable", memory_bytes: NaN };
    const healthy = n.healthy !== false && byId.has(id);
    const layers = ranges.get(id) || (Array.isArray(n.layers) ? n.layers : null);
    const g = svg("g", { class: `node${healthy ? "" : " unhealthy"}${n.self ? " self" : ""}`, "data-node-id": id,
                         transform: `translate(${cardX(i)},${cardY(i)})` }, root);
    svg("title", {}, g, [`${id}${n.self ? " (this node)" : ""}`, n.address && `address ${n.address}`,
                         n.api_port && `API port ${n.api_port}`, n.device, gb(n.memory_bytes),
                         layers ? `layers ${range(layers[0], layers[1])}` : "no layers", healthy ? "healthy" : "unhealthy"]
                        .filter(Boolean).join("\n"));
    const col = healthy ? colour(id) : "#9ca3af";
    svg("rect", { x: 0, y: 0, width: W, height: H, rx: 10, ry: 10, class: "card", stroke: col }, g);
    const clipEl = svg("clipPath", { id: `card-clip-${i}` }, g);
    svg("rect", { x: 0, y: 0, width: W, height: H, rx: 10, ry: 10 }, clipEl);
    svg("rect", { x: 0, y: 0, width: 7, height: H, fill: col, class: "stripe", "clip-path": `url(#card-clip-${i})` }, g);
    svg("circle", { cx: W - 14, cy: 16, r: 5, class: healthy ? "health ok" : "health bad" }, g);
    svg("text", { x: 20, y: 24, class: "node-id" }, g, clip(id, 14));
    if (n.self) svg("text", { x: W - 26, y: 20, class: "badge", "text-anchor": "end" }, g, "you");
    svg("text", { x: 20, y: 45, class: "node-line" }, g, clip(n.device || "unknown device", 24));
    svg("text", { x: 20, y: 62, class: "node-line" }, g, `${gb(n.memory_bytes)} memory`);
    svg("text", { x: 20, y: 79, class: "node-addr" }, g, clip(n.address || "no address", 26));
    svg("text", { x: 20, y: 100, class: "node-layers" }, g,
        healthy ? (layers ? `layers ${range(layers[0], layers[1])}` : "idle — no layers") : "unhealthy");
  });

  // The layer bar: 0..n_layers split into one segment per stage.
  const barX = PAD, barW = width - 2 * PAD;
  svg("rect", { x: barX, y: barY, width: barW, height: barH, rx: 6, ry: 6, class: "bar-bg" }, root);
  if (nLayers > 0) {
    const sx = (l) => barX + (barW * l) / nLayers;
    for (const s of plan) {
      const n = byId.get(s.node_id);
      const healthy = n && n.healthy !== false;
      const x = sx(s.start), w = Math.max(1, sx(s.end) - sx(s.start));
      const seg = svg("rect", { x, y: barY, width: w, height: barH, class: `segment${healthy ? "" : " unhealthy"}`,
                                fill: healthy ? colour(s.node_id) : "#9ca3af",
                                "data-node-id": s.node_id, "data-start": s.start, "data-end": s.end }, root);
      svg("title", {}, seg, `${s.node_id}: layers ${range(s.start, s.end)} (${s.end - s.start} of ${nLayers})`);
      const label = `${s.node_id}: ${range(s.start, s.end)}`;
      if (label.length * 7 + 8 < w) svg("text", { x: x + w / 2, y: barY + barH / 2 + 4, class: "seg-label", "text-anchor": "middle" }, root, label);
      else {  // too narrow for its label: write it under the bar, kept inside the picture
        const half = (label.length * 7) / 2, cx = Math.min(Math.max(x + w / 2, barX + half), barX + barW - half);
        svg("text", { x: cx, y: barY + barH + 32, class: "seg-label outside", "text-anchor": "middle" }, root, label);
      }
    }
    // Segment boundaries as ticks under the bar.
    const ticks = [...new Set([0, nLayers, ...plan.map((s) => s.start), ...plan.map((s) => s.end)])].sort((a, b) => a - b);
    let lastLabelX = -Infinity;
    for (const t of ticks) {
      const x = sx(t);
      svg("line", { x1: x, y1: barY + barH, x2: x, y2: barY + barH + 5, class: "tick" }, root);
      const crowded = x - lastLabelX < 22 || (t !== nLayers && sx(nLayers) - x < 28);  // numbers would overlap
      if (crowded && t !== nLayers) continue;
      lastLabelX = x;
      svg("text", { x, y: barY + barH + 16, class: "tick-label", "text-anchor": t === 0 ? "start" : t === nLayers ? "end" : "middle" }, root, `${t}`);
    }
  }
  if (!plan.length) svg("text", { x: width / 2, y: barY + barH / 2 + 4, class: "seg-label empty", "text-anchor": "middle" }, root,
                        "no partition plan yet");
}

async function pollCluster() {
  try {
    const r = await api("/v1/cluster", { cache: "no-store", signal: AbortSignal.timeout(POLL_MS * 3) });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const c = await r.json();
    const key = JSON.stringify(c);
    if (key !== state.lastCluster) { state.lastCluster = key; state.clusterData = c; drawCluster(c); }
    if (c.model) $("model-name").textContent = c.model;
    if (Number.isFinite(c.n_layers)) $("model-layers").textContent = `${c.n_layers} layers`;
    const nodes = Array.isArray(c.nodes) ? c.nodes : [];
    const bad = nodes.filter((n) => n.healthy === false).length;
    $("cluster-status").textContent = `${nodes.length} node${nodes.length === 1 ? "" : "s"}` +
      (bad ? ` · ${bad} unhealthy` : "") + ` · updated ${new Date().toLocaleTimeString()}`;
    setConn(bad ? "warn" : "ok", bad ? "degraded" : "connected");
    $("cluster").classList.remove("stale");
  } catch (e) {
    setConn("bad", "unreachable");
    $("cluster-status").textContent = `cannot reach /v1/cluster (${e.message})`;
    $("cluster").classList.add("stale");
  } finally {
    setTimeout(pollCluster, POLL_MS);
  }
}

function setConn(level, text) {
  $("conn").dataset.state = level;
  $("conn-text").textContent = text;
}

// ---------------------------------------------------------------- wiring

function init() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      if (!$("send").disabled) send();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", clearChat);
  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (state.clusterData) drawCluster(state.clusterData); }, 150);
  });
  loadModel().catch((e) => setConn("bad", e.message));
  pollCluster();
  $("prompt").focus();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
