// Strata's swarm dashboard: polls /strata/swarm (this node's /health plus every reachable node's
// counters), draws the layer map and the node table, and streams chat answers from
// /v1/chat/completions. Plain DOM, no dependencies: the page must work with no internet.
"use strict";

(() => {
  const POLL_MS = 1000;
  const SPARK_POINTS = 60;

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };

  let prev = null; // the previous SwarmView, for rates
  let polls = 0; // polls made, for the quick second one
  let modelID = "";
  const tpsHistory = [];
  const conversation = []; // {role, content} sent with every chat request
  let inflight = null; // AbortController of the answer streaming now

  // ---------- formatting ----------

  // The one short form of a peer ID, as strata status and the logs show it: the last 8 characters.
  const short = (id) => (id ? (id.length > 12 ? "…" + id.slice(-8) : id) : "?");
  // A node keeps its colour for as long as the page is open; new nodes take the next one.
  const PALETTE = ["#3b6fb6", "#d0731c", "#3a9a4a", "#c23b3b", "#7d5bb5", "#8c5a3c", "#c2569b", "#5f6b73", "#9a9a1f", "#1f9aa8"];
  const colors = new Map();
  function color(id) {
    if (!colors.has(id)) {
      const i = colors.size;
      colors.set(id, i < PALETTE.length ? PALETTE[i] : `hsl(${(i * 137.5) % 360} 50% 42%)`);
    }
    return colors.get(id);
  }
  function bytes(n) {
    if (!(n > 0)) return "0 B";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(n < 10 && i > 0 ? 1 : 0)} ${u[i]}`;
  }
  const num = (n, d = 0) => (Number.isFinite(n) ? n.toLocaleString(undefined, { maximumFractionDigits: d, minimumFractionDigits: d }) : "–");
  const ms = (s) => (Number.isFinite(s) ? (s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms` : `${s.toFixed(2)} s`) : "–");
  const layers = (r) => `[${r.start},${r.end})`; // half-open, as strata status and the logs write ranges

  // rate of a counter between two polls of the same node; a restarted node starts from 0
  function rate(cur, old, field) {
    if (!cur || !old) return NaN;
    const dt = (cur.time_ms - old.time_ms) / 1000;
    if (dt <= 0) return NaN;
    const d = cur[field] - old[field];
    return d >= 0 ? d / dt : NaN;
  }

  // ---------- polling ----------

  async function poll() {
    try {
      const r = await fetch("strata/swarm", { cache: "no-store" });
      if (!r.ok) throw new Error(`${r.status} ${r.statusText}`);
      const v = await r.json();
      render(v);
      prev = v;
    } catch (e) {
      const b = $("ready");
      b.textContent = "node unreachable";
      b.className = "badge down";
    }
    // Rates need two polls: the second comes soon, so they do not read "–" for two seconds.
    setTimeout(poll, polls++ ? POLL_MS : 300);
  }

  function render(v) {
    const h = v.health;
    modelID = h.model;
    $("model").textContent = h.model;
    const b = $("ready");
    b.textContent = h.ready ? "ready" : "not ready";
    b.className = "badge " + (h.ready ? "ready" : "notready");
    $("via").textContent = `via node ${short(h.peer_id)} · ${h.layers} layers`;
    const miss = $("missing");
    miss.hidden = !h.missing;
    miss.textContent = h.missing ? `The swarm cannot serve the model yet: ${h.missing}` : "";
    renderTiles(v);
    renderMap(h);
    renderNodes(v);
    renderFetches(v);
  }

  // ---------- weights fetches ----------

  function renderFetches(v) {
    const rows = [];
    for (const [peer, st] of Object.entries(v.nodes || {})) {
      for (const f of st.fetches || []) {
        const tr = el("tr");
        const name = el("td");
        const sw = el("span", "swatch");
        sw.style.background = color(peer);
        name.append(sw, el("code", "", short(peer)));
        const pct = f.slice_bytes > 0 ? Math.min(100, (100 * f.tensor_bytes) / f.slice_bytes) : 0;
        const prog = el("progress");
        prog.max = 100;
        prog.value = f.done ? 100 : pct;
        prog.title = `${pct.toFixed(0)}%`;
        const progCell = el("td");
        progCell.append(prog);
        const srcs = Object.entries(f.peers || {}).map(([p, b]) => `${p === "hub" ? "hub" : short(p)} ${bytes(b)}`).join(", ");
        let state = "fetching";
        if (f.error) state = `failed: ${f.error}`;
        else if (f.done) state = f.verified ? "done, verified" : "done, unverified (no manifest yet)";
        if ((f.dropped || []).length) state += ` · dropped ${f.dropped.map(short).join(", ")}`;
        tr.append(
          name,
          el("td", "", layers(f.range)),
          el("td", "", f.from),
          progCell,
          el("td", "num", `${bytes(f.tensor_bytes)} / ${bytes(f.slice_bytes)}`),
          el("td", "num", `${bytes(f.bytes_per_sec)}/s`),
          el("td", "", srcs || "–"),
          el("td", f.error ? "bad" : "", state),
        );
        rows.push(tr);
      }
    }
    $("fetches-section").hidden = rows.length === 0;
    $("fetches").tBodies[0].replaceChildren(...rows);
  }

  // ---------- totals ----------

  function renderTiles(v) {
    const nodes = Object.values(v.nodes || {});
    let tps = 0, known = false, active = 0, tokens = 0, ttftSum = 0, ttftN = 0, wireRate = 0, wireTotal = 0;
    for (const n of nodes) {
      const old = prev && prev.nodes && prev.nodes[n.peer_id];
      const t = rate(n, old, "tokens");
      if (Number.isFinite(t)) { tps += t; known = true; }
      const w = rate(n, old, "wire_out_bytes");
      if (Number.isFinite(w)) wireRate += w;
      active += n.active;
      tokens += n.tokens;
      ttftSum += n.ttft_seconds_sum;
      ttftN += n.ttft_count;
      wireTotal += n.wire_out_bytes;
    }
    $("tps").textContent = known ? num(tps, 1) : "–";
    $("active").textContent = num(active);
    $("tokens").textContent = num(tokens);
    $("ttft").textContent = ttftN ? ms(ttftSum / ttftN) : "–";
    $("wire").textContent = `${bytes(wireRate)}/s`;
    $("wiretotal").textContent = `${bytes(wireTotal)} sent since start`;
    if (known) {
      tpsHistory.push(tps);
      if (tpsHistory.length > SPARK_POINTS) tpsHistory.shift();
      spark();
    }
  }

  function spark() {
    const c = $("spark");
    const g = c.getContext("2d");
    const w = c.width, hgt = c.height;
    g.clearRect(0, 0, w, hgt);
    const max = Math.max(1, ...tpsHistory);
    g.strokeStyle = getComputedStyle(document.documentElement).getPropertyValue("--accent") || "#2f6fdb";
    g.lineWidth = 1.5;
    g.beginPath();
    tpsHistory.forEach((y, i) => {
      const x = (i / (SPARK_POINTS - 1)) * w;
      const yy = hgt - 2 - (y / max) * (hgt - 4);
      if (i === 0) g.moveTo(x, yy); else g.lineTo(x, yy);
    });
    g.stroke();
  }

  // ---------- layer map ----------

  // memoryNote is what this node's own layers cost (/health's range_memory), for its
  // segment's tooltip: the sums and each layer, as strata status prints them.
  function memoryNote(p, m) {
    if (!p.self || !m || m.range.start !== p.range.start || m.range.end !== p.range.end) return "";
    const rows = (m.layers || []).map((l) =>
      `\n  layer ${l.layer}: weights ${bytes(l.weight_bytes)}, KV ${bytes(l.kv_bytes)}${l.window ? `, window ${l.window}` : ""}`);
    return `\nweights ${bytes(m.weight_bytes)}, KV cache ${bytes(m.kv_bytes)} (${m.sessions} sessions x ${m.context} tokens)` + rows.join("");
  }

  function renderMap(h) {
    const L = h.layers;
    const peers = h.peers || [];
    const chains = new Map();
    const idle = [];
    for (const p of peers) {
      if (!p.range || p.range.end <= p.range.start) { idle.push(p); continue; }
      const c = p.chain >= 0 ? p.chain : -1;
      if (!chains.has(c)) chains.set(c, []);
      chains.get(c).push(p);
    }
    [...peers].sort((a, b) => a.range.start - b.range.start || a.peer_id.localeCompare(b.peer_id)).forEach((p) => color(p.peer_id));
    const box = $("layermap");
    const rows = [];
    const keys = [...chains.keys()].sort((a, b) => (a < 0) - (b < 0) || a - b);
    for (const c of keys) {
      const members = chains.get(c).sort((a, b) => a.range.start - b.range.start || a.peer_id.localeCompare(b.peer_id));
      const row = el("div", "chainrow");
      row.dataset.chain = c;
      row.append(el("div", "chainlabel", c < 0 ? "unplanned" : c === 0 ? "chain 0" : `chain ${c} · replica`));
      const bar = el("div", "bar");
      bar.style.gridTemplateColumns = `repeat(${L}, minmax(0, 1fr))`;
      let covered = 0;
      for (const p of members) {
        if (p.range.start > covered) bar.append(gap(covered, p.range.start));
        const s = el("div", "seg");
        s.dataset.peer = p.peer_id;
        s.style.gridColumn = `${p.range.start + 1} / ${Math.min(p.range.end, L) + 1}`;
        s.style.gridRow = "1";
        s.style.background = color(p.peer_id);
        if (p.self) s.classList.add("self");
        if (p.state !== "serving") s.classList.add("loading");
        s.title = `node ${p.peer_id}\nlayers ${layers(p.range)} of ${L}\nstate ${p.state}` + memoryNote(p, h.range_memory);
        s.append(el("span", "", `node ${short(p.peer_id)}${p.self ? " (this)" : ""}`), el("span", "", `layers ${layers(p.range)}`));
        bar.append(s);
        covered = Math.max(covered, p.range.end);
      }
      if (covered < L) bar.append(gap(covered, L));
      row.append(bar);
      rows.push(row);
    }
    if (keys.length) {
      const rr = el("div", "chainrow");
      rr.append(el("div", "chainlabel", "layer"));
      const ruler = el("div", "ruler");
      ruler.style.gridTemplateColumns = `repeat(${L}, minmax(0, 1fr))`;
      const every = Math.max(1, Math.ceil(L / 32));
      for (let i = 0; i < L; i++) ruler.append(el("span", "", i % every === 0 ? String(i) : ""));
      rr.append(ruler);
      rows.push(rr);
    } else {
      rows.push(el("p", "muted", "No node holds layers yet."));
    }
    if (idle.length) {
      const p = el("p", "idle muted");
      p.append("Holding no layers: ");
      idle.forEach((n, i) => {
        const s = el("span", "", `${i ? ", " : ""}node ${short(n.peer_id)} (${n.memory_bytes > 0 ? n.state : "API only"})`);
        s.dataset.peer = n.peer_id;
        p.append(s);
      });
      rows.push(p);
    }
    box.replaceChildren(...rows);
  }

  function gap(start, end) {
    const g = el("div", "seg gap", `no node: layers ${layers({ start, end })}`);
    g.style.gridColumn = `${start + 1} / ${end + 1}`;
    g.style.gridRow = "1";
    return g;
  }

  // ---------- node table ----------

  function renderNodes(v) {
    const peers = [...(v.health.peers || [])].sort((a, b) =>
      (a.range.end > a.range.start ? 0 : 1) - (b.range.end > b.range.start ? 0 : 1) ||
      a.chain - b.chain || a.range.start - b.range.start || a.peer_id.localeCompare(b.peer_id));
    // Mean step round trip to each peer, from every node that sends it steps.
    const rtt = {};
    for (const n of Object.values(v.nodes || {})) {
      for (const [peer, count] of Object.entries(n.hop_steps || {})) {
        const r = (rtt[peer] = rtt[peer] || { n: 0, s: 0 });
        r.n += count;
        r.s += (n.hop_seconds_sum || {})[peer] || 0;
      }
    }
    const rows = peers.map((p) => {
      const st = (v.nodes || {})[p.peer_id];
      const old = prev && prev.nodes && prev.nodes[p.peer_id];
      const tr = el("tr");
      tr.dataset.peer = p.peer_id;
      const name = el("td");
      const sw = el("span", "swatch");
      sw.style.background = color(p.peer_id);
      name.append(sw, el("code", "", short(p.peer_id)));
      name.title = p.peer_id + (p.api ? `\nAPI ${p.api}` : "") + `\ngossip ${p.gossip}`;
      if (p.self) name.append(el("span", "self", "this node"));
      const unreachable = (v.unreachable || {})[p.peer_id];
      const state = el("td", "", p.state);
      if (unreachable) state.title = `counters unavailable: ${unreachable}`;
      const r = rtt[p.peer_id];
      tr.append(
        name,
        state,
        placementCell(p, st),
        el("td", "", p.chain >= 0 ? String(p.chain) : "–"),
        el("td", "num", p.memory_bytes > 0 ? bytes(p.memory_bytes) : "API only"),
        el("td", "num", bytes(p.free_ram_bytes)),
        el("td", "num", st ? bytes(st.resident_bytes) : "–"),
        el("td", "num", p.ms_per_layer > 0 ? num(p.ms_per_layer, 2) : "–"),
        el("td", "num", num(p.sessions)),
        el("td", "num", num(rate(st, old, "stage_steps"), 1)),
        // Only entry nodes count tokens; a stage that only computes shows its steps/s instead.
        el("td", "num", st && st.tokens > 0 ? num(rate(st, old, "tokens"), 1) : "–"),
        el("td", "num", r && r.n ? ms(r.s / r.n) : "–"),
      );
      return tr;
    });
    $("nodes").tBodies[0].replaceChildren(...rows);
  }

  // The layers a node serves, and which of them sit on a GPU when any do.
  function placementCell(p, st) {
    const td = el("td", "", p.range.end > p.range.start ? layers(p.range) : "–");
    if (st && st.placement) {
      td.title = `computes on ${st.placement}`;
      if (!/^CPU [^,]*$/.test(st.placement)) td.append(el("div", "placement", st.placement));
    }
    return td;
  }

  // ---------- chat ----------

  function addMessage(role, text) {
    const m = el("div", `msg ${role}`);
    m.append(el("div", "who", role === "user" ? "you" : `${modelID || "model"}`), el("div", "text", text));
    $("messages").append(m);
    scrollChat();
    return m;
  }
  function scrollChat() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  function busy(on) {
    $("send").disabled = on;
    $("stop").hidden = !on;
  }

  async function send() {
    const input = $("chat-input");
    const text = input.value.trim();
    if (!text || inflight) return;
    input.value = "";
    conversation.push({ role: "user", content: text });
    addMessage("user", text);
    const msg = addMessage("assistant", "");
    const out = msg.querySelector(".text");
    msg.dataset.state = "streaming";
    msg.dataset.chunks = "0";
    const ctrl = new AbortController();
    inflight = ctrl;
    busy(true);
    const t0 = performance.now();
    let first = 0, chunks = 0, content = "", usage = null;
    try {
      const headers = { "Content-Type": "application/json" };
      const key = $("api-key").value.trim();
      if (key) headers.Authorization = `Bearer ${key}`;
      const body = {
        model: modelID,
        messages: conversation,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Math.max(1, parseInt($("max-tokens").value, 10) || 256),
        temperature: Math.max(0, parseFloat($("temperature").value) || 0),
      };
      const r = await fetch("v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: ctrl.signal });
      if (!r.ok) {
        let why = `${r.status} ${r.statusText}`;
        try {
          const j = await r.json();
          if (j.error && j.error.message) why = j.error.message;
        } catch (_) { /* not JSON: keep the status */ }
        if (r.status === 401) $("keylabel").hidden = false;
        throw new Error(why);
      }
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true }).replace(/\r\n/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const event = buf.slice(0, i);
          buf = buf.slice(i + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const j = JSON.parse(data);
            if (j.error) throw new Error(j.error.message || "the swarm failed mid-answer");
            if (j.usage) usage = j.usage;
            for (const c of j.choices || []) {
              const d = c.delta && c.delta.content;
              if (!d) continue;
              if (!first) first = performance.now();
              content += d;
              chunks++;
              out.textContent = content;
              msg.dataset.chunks = String(chunks);
              scrollChat();
            }
          }
        }
      }
      msg.dataset.state = "done";
    } catch (e) {
      if (e.name === "AbortError") {
        msg.dataset.state = "stopped";
      } else {
        msg.dataset.state = "error";
        msg.classList.add("error");
        out.textContent = (content ? content + "\n" : "") + `Error: ${e.message}`;
      }
    } finally {
      inflight = null;
      busy(false);
    }
    if (content) conversation.push({ role: "assistant", content });
    else conversation.pop(); // an answer that never came: let the question be asked again
    const end = performance.now();
    const ntok = usage ? usage.completion_tokens : chunks;
    const parts = [`${ntok} tokens`];
    if (first && end > first && ntok > 1) parts.push(`${num((ntok - 1) / ((end - first) / 1000), 1)} tok/s`);
    if (first) parts.push(`first token ${ms((first - t0) / 1000)}`);
    if (msg.dataset.state === "stopped") parts.push("stopped");
    msg.append(el("div", "stats", parts.join(" · ")));
    scrollChat();
  }

  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => { if (inflight) inflight.abort(); });
  $("clear").addEventListener("click", () => {
    if (inflight) inflight.abort();
    conversation.length = 0;
    $("messages").replaceChildren();
  });

  poll();
})();
