// kgpu dashboard: a single-page app over the controller's JSON API. Plain JS, no dependencies.
// Every piece of data reaches the page through textContent / setAttribute: never as HTML markup.
"use strict";

(() => {
  const POLL_MS = 2500;
  const PAGE_NODES = 100; // nodes a page of the overview
  const SVGNS = "http://www.w3.org/2000/svg";
  const NODE_STATES = ["upgrade-required", "pod-deletion-required", "validation-required",
    "upgrade-done", "upgrade-failed", "offline-deferred"];

  // ---- DOM helpers -------------------------------------------------------------------------

  function build(node, attrs, children) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "style") {
        for (const [prop, v] of Object.entries(value)) node.style.setProperty(prop, v); // CSSOM: CSP-safe
      } else if (key === "dataset") {
        for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
      } else {
        node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === undefined || child === null || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const el = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const svg = (tag, attrs, ...children) => build(document.createElementNS(SVGNS, tag), attrs, children);

  class HttpError extends Error {
    constructor(path, status, body) {
      super(`${path}: HTTP ${status}${body && body.error ? ` (${body.error})` : ""}`);
      this.status = status;
    }
  }

  // With `--api-auth all` reads need the API token: the page asks for it once and keeps it in
  // sessionStorage (this tab only, gone when it closes), sending it as a bearer token.
  const TOKEN_KEY = "kgpu-api-token";
  const storedToken = () => { try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; } };

  async function api(path) {
    const headers = { Accept: "application/json" };
    const token = storedToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok) throw new HttpError(path, response.status, body);
    return body;
  }

  // ---- formatting --------------------------------------------------------------------------

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  function num(v, digits = 0, unit = "") {
    return isNum(v) ? `${v.toFixed(digits)}${unit}` : "—";
  }
  function ago(seconds) {
    if (!isNum(seconds)) return "—";
    const s = Math.max(0, seconds);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
    return `${(s / 86400).toFixed(1)} d ago`;
  }
  const nowS = () => Date.now() / 1000;
  function clock(ts) {
    if (!isNum(ts)) return "—";
    const d = new Date(ts * 1000);
    const today = new Date();
    const time = d.toLocaleTimeString([], { hour12: false });
    return d.toDateString() === today.toDateString() ? time : `${d.toLocaleDateString()} ${time}`;
  }
  function short(value, max = 160) {
    let text;
    if (typeof value === "string") text = value;
    else { try { text = JSON.stringify(value); } catch (_) { text = String(value); } }
    return text.length > max ? `${text.slice(0, max - 1)}…` : text;
  }
  function tempClass(t) {
    if (!isNum(t)) return "unknown";
    return t >= 83 ? "hot" : t >= 70 ? "warm" : "ok";
  }
  const healthOf = (h) => (h === "healthy" || h === "unhealthy" || h === "lost" ? h : "unknown");
  const pill = (text, cls) => el("span", { class: `pill ${cls || ""}` }, text);
  const nodeLink = (name) => el("a", { href: `#/nodes/${encodeURIComponent(name)}` }, name);
  const empty = (title, hint) => el("div", { class: "empty" }, el("strong", {}, title), hint ? el("p", {}, hint) : null);

  // ---- shared pieces -----------------------------------------------------------------------

  function gpuTile(gpu, online) {
    const s = gpu.sample || {};
    const health = healthOf(gpu.health);
    const limit = isNum(s.power_limit_w) ? s.power_limit_w : gpu.power_limit_w;
    const util = isNum(s.utilization_pct) ? Math.max(0, Math.min(100, s.utilization_pct)) : null;
    return el("div", {
      class: `gpu health-${health}${online === false ? " stale" : ""}`,
      dataset: { health, uuid: gpu.uuid, index: gpu.index },
      title: `${gpu.name || "GPU"} ${gpu.uuid}\nhealth: ${gpu.health || "unknown"}`,
    },
      el("div", { class: "gpu-head" }, el("span", { class: "gpu-idx" }, `GPU ${gpu.index}`),
        el("span", { class: `health-label ${health}` }, health)),
      el("div", { class: "gpu-metrics" },
        el("span", { class: `temp ${tempClass(s.temperature_c)}`, title: "temperature" }, num(s.temperature_c, 0, "°C")),
        el("span", { class: "power", title: "power / enforced limit" },
          `${num(s.power_w, 0)}/${num(limit, 0, " W")}`)),
      el("div", { class: "util", title: `utilisation ${num(util, 0, "%")}` },
        el("div", { class: "util-bar", style: { width: `${util ?? 0}%` } }),
        el("span", { class: "util-text" }, `util ${num(util, 0, "%")}`)),
    );
  }

  function histogram(counts, total) {
    const bar = el("div", { class: "histo-bar", role: "img", "aria-label": "node states" });
    const legend = el("div", { class: "histo-legend" });
    for (const state of NODE_STATES) {
      const n = (counts && counts[state]) || 0;
      if (n > 0 && total > 0) {
        bar.append(el("div", { class: `seg st-${state}`, title: `${state}: ${n}`, style: { width: `${(100 * n) / total}%` } }));
      }
      legend.append(el("span", { class: `legend-item${n ? "" : " zero"}` }, el("i", { class: `swatch st-${state}` }), `${state} ${n}`));
    }
    if (!total) bar.append(el("div", { class: "seg none" }));
    return el("div", { class: "histo" }, bar, legend);
  }

  function migrationCard(m) {
    const steps = Array.isArray(m.steps) ? m.steps : [];
    const pods = Object.entries(m.pods || {});
    return el("article", { class: "card migration", dataset: { id: m.id, state: m.state } },
      el("div", { class: "card-head" },
        el("strong", {}, `#${m.id}`), pill(m.state, `mig-${m.state}`),
        el("span", {}, "node ", nodeLink(m.node)),
        el("span", { class: "muted" }, `trigger ${m.trigger}`),
        el("span", { class: "muted right" }, `created ${clock(m.created_at)} · updated ${clock(m.updated_at)}`)),
      el("p", { class: "reason" }, m.reason),
      m.subjects && m.subjects.length ? el("p", { class: "muted small" }, `subjects: ${m.subjects.join(", ")}`) : null,
      steps.length
        ? el("ol", { class: "steps" }, steps.map((step) => el("li", {},
          el("span", { class: "muted" }, clock(step.at)), " ",
          el("strong", {}, step.step || "step"), " ",
          step.outcome ? pill(step.outcome, `out-${step.outcome}`) : null, " ",
          step.detail ? short(step.detail, 300) : "")))
        : el("p", { class: "muted small" }, "no steps taken yet"),
      pods.length
        ? el("table", { class: "mini" }, el("tbody", {}, pods.map(([pod, what]) =>
          el("tr", {}, el("td", {}, pod), el("td", {}, short(what, 200))))))
        : null,
    );
  }

  // ---- charts ------------------------------------------------------------------------------

  function niceTicks(lo, hi, count = 4) {
    const span = hi - lo || 1;
    const raw = span / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) ticks.push(v);
    return ticks;
  }

  // series: [{label, cls, points: [[ts, value], ...], dashed}]
  function lineChart({ title, unit, series, zero = false }) {
    const W = 560, H = 170, L = 44, R = 10, T = 10, B = 24;
    const all = series.flatMap((s) => s.points);
    const box = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`,
      role: "img", "aria-label": title });
    const figure = el("figure", { class: "chart-box" },
      el("figcaption", {}, title,
        el("span", { class: "legend" }, series.map((s) => el("span", { class: `key ${s.cls}${s.dashed ? " dashed" : ""}` }, s.label)))),
      box);
    if (all.length === 0) {
      box.append(svg("text", { x: W / 2, y: H / 2, class: "chart-empty", "text-anchor": "middle" }, "no samples yet"));
      return figure;
    }
    let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
    if (x1 - x0 < 1) { x0 -= 30; x1 += 30; }
    let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
    if (zero) y0 = Math.min(0, y0);
    const pad = (y1 - y0) * 0.1 || Math.max(1, Math.abs(y1) * 0.1);
    y1 += pad; if (!zero) y0 -= pad;
    const sx = (t) => L + ((t - x0) / (x1 - x0)) * (W - L - R);
    const sy = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
    for (const tick of niceTicks(y0, y1)) {
      const y = sy(tick).toFixed(1);
      box.append(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
      box.append(svg("text", { x: L - 4, y: Number(y) + 4, class: "axis", "text-anchor": "end" }, `${+tick.toFixed(1)}`));
    }
    box.append(svg("text", { x: L, y: H - 6, class: "axis" }, clock(x0)));
    box.append(svg("text", { x: W - R, y: H - 6, class: "axis", "text-anchor": "end" }, clock(x1)));
    box.append(svg("text", { x: 4, y: T + 8, class: "axis unit" }, unit));
    for (const s of series) {
      if (!s.points.length) continue;
      const pts = s.points.map(([t, v]) => `${sx(t).toFixed(1)},${sy(v).toFixed(1)}`).join(" ");
      box.append(svg("polyline", { points: pts, class: `line ${s.cls}${s.dashed ? " dashed" : ""}`,
        "vector-effect": "non-scaling-stroke", dataset: { points: s.points.length } },
      svg("title", {}, `${s.label}: latest ${num(s.points[s.points.length - 1][1], 1, ` ${unit}`)}`)));
      const [lt, lv] = s.points[s.points.length - 1];
      box.append(svg("circle", { cx: sx(lt).toFixed(1), cy: sy(lv).toFixed(1), r: 2.5, class: `dot ${s.cls}` }));
    }
    return figure;
  }

  function seriesOf(samples, field) {
    return samples.filter((s) => isNum(s[field])).map((s) => [s.ts, s[field]]);
  }

  // ---- views -------------------------------------------------------------------------------

  // The overview shows one page of nodes at a time (the fleet call pages; its figures cover the
  // whole fleet): the cursors of the pages visited, so that "previous" can go back.
  const fleetCursors = [null];
  let fleetPage = 0;

  function pager(shown, nextCursor, total) {
    if (fleetPage === 0 && !nextCursor) return null;
    const go = (page) => { fleetPage = page; refresh(); };
    const first = fleetPage * PAGE_NODES + 1;
    const button = (label, id, enabled, page) => {
      const b = el("button", { type: "button", id, disabled: !enabled }, label);
      b.addEventListener("click", () => go(page));
      return b;
    };
    return el("nav", { class: "pager", id: "fleet-pager", "aria-label": "pages of nodes" },
      button("« first", "page-first", fleetPage > 0, 0),
      button("‹ previous", "page-prev", fleetPage > 0, fleetPage - 1),
      el("span", { class: "muted" }, `nodes ${first}–${first + shown - 1} of ${total}`),
      button("next ›", "page-next", Boolean(nextCursor), fleetPage + 1));
  }

  async function overview() {
    fleetPage = Math.min(fleetPage, fleetCursors.length - 1);
    const cursor = fleetCursors[fleetPage];
    const data = await api(`/api/v1/dashboard/fleet?limit=${PAGE_NODES}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
    const nodes = data.nodes || [];
    fleetCursors.length = fleetPage + 1;
    if (data.next_cursor) fleetCursors.push(data.next_cursor);
    const now = isNum(data.generated_at) ? data.generated_at : nowS();
    const sum = data.summary || {};
    const total = sum.nodes ?? nodes.length;
    const online = sum.online ?? 0;
    const bad = sum.unhealthy_gpus ?? 0;
    const overBudget = sum.over_budget ?? 0;
    const stat = (label, value, cls) => el("div", { class: `stat ${cls || ""}` },
      el("div", { class: "stat-value" }, value), el("div", { class: "stat-label" }, label));
    const view = [
      el("h1", {}, "Fleet"),
      el("section", { class: "stats" },
        stat("nodes", total),
        stat("online", online, online ? "good" : ""),
        stat("offline", total - online, total - online ? "bad" : ""),
        stat("GPUs", sum.gpus ?? 0),
        stat("unhealthy GPUs", bad, bad ? "bad" : "good"),
        stat("fleet power", `${num(sum.power_w ?? 0, 0)} W`),
        overBudget ? stat("over budget", overBudget, "bad") : null),
    ];
    if (!nodes.length && fleetPage === 0) {
      view.push(empty("No nodes have reported yet.",
        "Nodes appear here once an edge daemon (kgpu edge run --mqtt …) sends its first status."));
      return view;
    }
    view.push(pager(nodes.length, data.next_cursor, total));
    view.push(el("table", { class: "nodes", id: "nodes-table" },
      el("thead", {}, el("tr", {}, ["Node", "State", "GPUs", "Last seen", "Outbox", "Policy", "Version"]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, nodes.map((n) => {
        const degraded = Array.isArray(n.degraded) ? n.degraded : n.degraded ? Object.keys(n.degraded) : [];
        return el("tr", { class: n.online ? "online" : "offline", dataset: { node: n.name } },
          el("td", { class: "node-name" }, nodeLink(n.name),
            n.over_budget ? el("div", { class: "chips" }, pill(`over budget: ${short(n.over_budget, 40)}`, "bad over-budget")) : null,
            degraded.length ? el("div", { class: "chips" }, degraded.map((d) => pill(short(d, 60), "warn"))) : null),
          el("td", {}, pill(n.online ? "online" : "offline", n.online ? "good" : "bad")),
          el("td", {}, (n.gpus || []).length
            ? el("div", { class: "gpus" }, n.gpus.map((g) => gpuTile(g, n.online)),
              n.gpus_truncated ? el("span", { class: "muted small" }, `+${(n.gpu_summary || {}).count - n.gpus.length} more`) : null)
            : el("span", { class: "muted" }, "no GPUs reported")),
          el("td", { title: clock(n.last_seen) }, ago(now - n.last_seen)),
          el("td", { class: n.outbox_depth > 0 ? "warn-text" : "" }, n.outbox_depth ?? "—"),
          el("td", {}, n.policy_name ? `${n.policy_name} v${n.policy_version ?? "?"}`
            : isNum(n.policy_version) ? `v${n.policy_version}` : "—"),
          el("td", {}, n.daemon_version || "—"));
      }))));
    return view;
  }

  function eventSummary(e) {
    const b = e.body || {};
    switch (e.kind) {
      case "xid": return `XID ${b.xid} on GPU ${b.gpu_index} → ${b.action}`;
      case "health": return `${b.level}${b.gpu_index !== undefined && b.gpu_index !== null ? ` GPU ${b.gpu_index}` : ""}: ` +
        `${b.previous} → ${b.current}${b.reasons && b.reasons.length ? ` (${b.reasons.join("; ")})` : ""}`;
      case "migration_request": return `migration requested (${b.trigger})${b.gpu_index !== undefined && b.gpu_index !== null ? ` for GPU ${b.gpu_index}` : ""}: ${b.reason}`;
      case "command_result": return `${b.command} ${b.ok ? "ok" : "failed"}${b.detail ? `: ${b.detail}` : ""}`;
      case "offline_summary": return `offline ${clock(b.from_ts)} → ${clock(b.to_ts)}, ${(b.gpus || []).length} GPU summaries`;
      default: return short(b);
    }
  }

  async function nodePage({ name }) {
    const q = encodeURIComponent(name);
    let node;
    try {
      node = await api(`/api/v1/nodes/${q}`);
    } catch (err) {
      if (err.status === 404) {
        return [el("h1", {}, name), empty("No such node.", "It has never reported to this controller."),
          el("p", {}, el("a", { href: "#/" }, "← back to the fleet"))];
      }
      throw err;
    }
    const [samples, events, decisions, migrations] = await Promise.all([
      api(`/api/v1/nodes/${q}/samples?limit=5000`),
      api(`/api/v1/events?node=${q}&limit=200`),
      api(`/api/v1/decisions?node=${q}&limit=200`),
      api(`/api/v1/migrations?node=${q}&limit=20`),
    ]);
    const byGpu = new Map();
    for (const s of samples.samples || []) {
      if (!byGpu.has(s.uuid)) byGpu.set(s.uuid, []);
      byGpu.get(s.uuid).push(s);
    }
    const labels = Object.entries(node.labels || {});
    const view = [
      el("p", { class: "crumbs" }, el("a", { href: "#/" }, "Fleet"), " / ", name),
      el("h1", {}, name, " ", pill(node.online ? "online" : "offline", node.online ? "good" : "bad"),
        node.over_budget ? pill(`over budget: ${short(node.over_budget, 40)}`, "bad over-budget") : null),
      el("dl", { class: "facts" },
        [["last seen", `${ago(nowS() - node.last_seen)} (${clock(node.last_seen)})`],
          ["daemon", node.daemon_version || "—"],
          ["policy", node.policy_name ? `${node.policy_name} v${node.policy_version ?? "?"}` : num(node.policy_version)],
          ["outbox depth", node.outbox_depth ?? "—"],
          ["acked seq", node.acked_seq ?? "—"],
          ["gaps", node.gaps ?? 0],
        ].map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)))),
      labels.length ? el("div", { class: "chips" }, labels.map(([k, v]) => pill(`${k}=${v}`, "label"))) : null,
      el("h2", {}, "GPUs"),
    ];
    const gpus = node.gpus || [];
    if (!gpus.length) view.push(empty("No GPUs reported yet."));
    if (node.gpus_truncated) view.push(el("p", { class: "note" }, `showing the first ${gpus.length} of ${(node.gpu_summary || {}).count} GPUs`));
    const grid = el("div", { class: "gpu-cards" });
    for (const g of gpus) {
      const rows = (byGpu.get(g.uuid) || []).slice();
      // history is downsampled (one row a minute by default): end the lines at the latest sample
      if (g.sample && isNum(g.sample.ts) && (!rows.length || g.sample.ts > rows[rows.length - 1].ts)) rows.push(g.sample);
      grid.append(el("section", { class: `card gpu-card health-${healthOf(g.health)}`, dataset: { uuid: g.uuid } },
        el("div", { class: "card-head" }, el("strong", {}, `GPU ${g.index}`), " ",
          el("span", { class: "muted" }, g.name || ""), pill(healthOf(g.health), `h-${healthOf(g.health)}`),
          el("span", { class: "muted small right mono" }, g.uuid)),
        gpuTile(g, node.online),
        el("div", { class: "charts" },
          lineChart({ title: "Temperature", unit: "°C", series: [{ label: "temperature", cls: "s-temp", points: seriesOf(rows, "temperature_c") }] }),
          lineChart({ title: "Power", unit: "W", zero: true, series: [
            { label: "power", cls: "s-power", points: seriesOf(rows, "power_w") },
            { label: "power limit", cls: "s-limit", dashed: true, points: seriesOf(rows, "power_limit_w") }] }))));
    }
    view.push(grid);

    const migs = migrations.migrations || [];
    if (migs.length) view.push(el("h2", {}, "Migrations"), el("div", { class: "cards" }, migs.map(migrationCard)));

    const timeline = [
      ...(events.events || []).filter((e) => e.kind !== "decision").map((e) => ({
        ts: e.ts, kind: e.kind, seq: e.seq, text: eventSummary(e), cls: `k-${e.kind}` })),
      ...(decisions.decisions || []).map((d) => ({
        ts: d.ts, kind: "decision", seq: d.seq, cls: `k-decision out-${d.outcome}`,
        text: `${d.rule}: ${d.action}${isNum(d.value) ? ` ${+d.value.toFixed(2)}` : ""} → ${d.outcome} — ${d.reason}` })),
    ].sort((a, b) => b.ts - a.ts || b.seq - a.seq).slice(0, 200);
    view.push(el("h2", {}, "Events and decisions"));
    view.push(timeline.length
      ? el("ol", { class: "timeline", id: "timeline" }, timeline.map((t) => el("li", { class: t.cls, dataset: { kind: t.kind } },
        el("time", {}, clock(t.ts)), pill(t.kind, `kind ${t.cls}`), el("span", { class: "tl-text" }, t.text))))
      : empty("No events or decisions yet."));
    return view;
  }

  async function migrationsPage() {
    const data = await api("/api/v1/migrations?limit=200");
    const rows = data.migrations || [];
    const view = [el("h1", {}, "Migrations")];
    if (data.cluster === false) view.push(el("p", { class: "note" }, data.detail || "no cluster"));
    view.push(rows.length ? el("div", { class: "cards", id: "migrations" }, rows.map(migrationCard))
      : empty("No migrations yet.", "A migration starts when a GPU turns unhealthy or an edge asks for one."));
    return view;
  }

  async function rolloutsPage() {
    const data = await api("/api/v1/rollouts?limit=100");
    const rows = data.rollouts || [];
    const view = [el("h1", {}, "Rollouts")];
    if (!rows.length) {
      view.push(empty("No rollouts yet.", "Start one with POST /api/v1/rollouts (needs a cluster)."));
      return view;
    }
    view.push(el("table", { class: "list", id: "rollouts" },
      el("thead", {}, el("tr", {}, ["#", "State", "Version", "Wave", "Nodes", "Created", "Reason"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {},
        el("td", {}, el("a", { href: `#/rollouts/${encodeURIComponent(r.id)}` }, `#${r.id}`)),
        el("td", {}, pill(r.state, `ro-${r.state}`)),
        el("td", {}, r.version || "—", r.image ? el("div", { class: "muted small mono" }, r.image) : null),
        el("td", {}, `${r.wave ?? "—"} / ${r.waveCount ?? "—"}`),
        el("td", { class: "histo-cell" }, histogram(r.counts, r.nodeCount)),
        el("td", {}, clock(r.createdAt)),
        el("td", {}, r.reason || ""))))));
    return view;
  }

  async function rolloutPage({ id }) {
    let r;
    try {
      r = await api(`/api/v1/rollouts/${encodeURIComponent(id)}`);
    } catch (err) {
      if (err.status === 404 || err.status === 400) return [el("h1", {}, `Rollout ${id}`), empty("No such rollout.")];
      throw err;
    }
    const nodes = r.nodes || [];
    return [
      el("p", { class: "crumbs" }, el("a", { href: "#/rollouts" }, "Rollouts"), " / ", `#${r.id}`),
      el("h1", {}, `Rollout #${r.id} `, pill(r.state, `ro-${r.state}`)),
      el("dl", { class: "facts" },
        [["version", r.version || "—"], ["image", r.image || "—"], ["wave", `${r.wave ?? "—"} / ${r.waveCount ?? "—"}`],
          ["max unavailable", r.maxUnavailableNodes ?? "—"], ["failure threshold", r.failureThresholdNodes ?? "—"],
          ["created", clock(r.createdAt)], ["finished", clock(r.finishedAt)], ["reason", r.reason || "—"]]
          .map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)))),
      histogram(r.counts, r.nodeCount),
      nodes.length ? el("table", { class: "list", id: "rollout-nodes" },
        el("thead", {}, el("tr", {}, ["Node", "State", "Wave", "Online", "Version", "From", "Since", "Reason"].map((h) => el("th", {}, h)))),
        el("tbody", {}, nodes.map((n) => el("tr", {},
          el("td", {}, nodeLink(n.node), n.canary ? pill("canary", "label") : null, n.reverting ? pill("reverting", "warn") : null),
          el("td", {}, pill(n.state, `st-${n.state}`)),
          el("td", {}, n.wave ?? "—"),
          el("td", {}, n.online === null ? "—" : pill(n.online ? "online" : "offline", n.online ? "good" : "bad")),
          el("td", {}, n.daemonVersion || "—"),
          el("td", {}, n.fromVersion || "—"),
          el("td", {}, clock(n.since)),
          el("td", {}, n.reason || "")))))
        : empty("No nodes in this rollout."),
    ];
  }

  async function policiesPage() {
    const data = await api("/api/v1/policies");
    const rows = data.policies || [];
    const view = [el("h1", {}, "Policies"), el("p", { class: "muted" }, `source: ${data.source || "—"}`)];
    if (!rows.length) {
      view.push(empty("No policies yet.", data.source === "kubernetes"
        ? "kubectl apply a GPUPowerPolicy to add one." : "PUT /api/v1/policies/<name> to add one."));
      return view;
    }
    view.push(el("table", { class: "list", id: "policies" },
      el("thead", {}, el("tr", {}, ["Name", "Valid", "Priority", "Node selector", "Policy", "Generation", "Status", "Updated"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((p) => el("tr", {},
        el("td", {}, el("strong", {}, p.name)),
        el("td", {}, pill(p.valid ? "valid" : "invalid", p.valid ? "good" : "bad"),
          p.valid ? null : el("div", { class: "small bad-text" }, p.reason || "",
            (p.errors || []).map((e) => el("div", {}, short(e, 200))))),
        el("td", {}, p.priority ?? "—"),
        el("td", {}, Object.keys(p.node_selector || {}).length
          ? el("div", { class: "chips" }, Object.entries(p.node_selector).map(([k, v]) => pill(`${k}=${short(v, 60)}`, "label")))
          : el("span", { class: "muted" }, "every node")),
        el("td", { class: "mono small" }, p.policy ? short(p.policy, 300) : "—"),
        el("td", {}, p.generation ?? "—"),
        el("td", { class: "small" }, Object.keys(p.status || {}).length ? short(p.status, 200) : "—"),
        el("td", {}, clock(p.updated_at)))))));
    return view;
  }

  // ---- routing and polling -----------------------------------------------------------------

  function route() {
    const parts = (location.hash.replace(/^#\/?/, "") || "").split("/").filter(Boolean).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    if (parts.length === 0) return { nav: "overview", render: overview, params: {} };
    if (parts[0] === "nodes" && parts.length === 2) return { nav: "overview", render: nodePage, params: { name: parts[1] } };
    if (parts[0] === "migrations" && parts.length === 1) return { nav: "migrations", render: migrationsPage, params: {} };
    if (parts[0] === "rollouts" && parts.length === 1) return { nav: "rollouts", render: rolloutsPage, params: {} };
    if (parts[0] === "rollouts" && parts.length === 2) return { nav: "rollouts", render: rolloutPage, params: { id: parts[1] } };
    if (parts[0] === "policies" && parts.length === 1) return { nav: "policies", render: policiesPage, params: {} };
    return { nav: "", render: async () => [el("h1", {}, "Not found"), empty("There is no such page.", el("a", { href: "#/" }, "Go to the fleet"))], params: {} };
  }

  let generation = 0;
  let timer = null;

  function setLive(ok, text) {
    const live = document.getElementById("live");
    live.className = `live ${ok ? "ok" : "err"}`;
    live.textContent = text;
  }

  function banner(text) {
    const b = document.getElementById("banner");
    b.hidden = !text;
    b.textContent = text || "";
  }

  function tokenForm(refused) {
    const input = el("input", { id: "token", type: "password", autocomplete: "off", required: true,
      placeholder: "bearer token", "aria-label": "API token" });
    const form = el("form", { id: "token-form", class: "token" },
      el("h1", {}, "API token needed"),
      el("p", { class: "muted" }, refused
        ? "The token was refused. Enter a valid one."
        : "This controller protects reads (--api-auth all). Enter the API token; it is kept in this tab only."),
      input, " ", el("button", { type: "submit" }, "Use token"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      try { sessionStorage.setItem(TOKEN_KEY, input.value.trim()); } catch (_) { /* storage off: nothing kept */ }
      refresh();
    });
    return form;
  }

  async function refresh() {
    const mine = ++generation;
    clearTimeout(timer);
    if (document.hidden) { timer = setTimeout(refresh, POLL_MS); return; }
    const current = route();
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.route === current.nav);
    try {
      const view = await current.render(current.params);
      if (mine !== generation) return;
      document.getElementById("main").replaceChildren(...view.filter(Boolean));
      document.body.dataset.ready = current.nav || "none";
      banner("");
      setLive(true, `live · ${new Date().toLocaleTimeString([], { hour12: false })}`);
    } catch (err) {
      if (mine !== generation) return;
      if (err instanceof HttpError && err.status === 401) {
        banner("");
        setLive(false, "token needed");
        document.getElementById("main").replaceChildren(tokenForm(Boolean(storedToken())));
        document.getElementById("token").focus();
        document.body.dataset.ready = "token";
        return; // no polling until a token is entered
      }
      banner(`Cannot reach the controller (${err.message}); retrying every ${POLL_MS / 1000} s.`);
      setLive(false, "disconnected");
    } finally {
      if (mine === generation && document.body.dataset.ready !== "token") timer = setTimeout(refresh, POLL_MS);
    }
  }

  window.addEventListener("hashchange", () => {
    document.getElementById("main").replaceChildren(el("p", { class: "empty" }, "Loading…"));
    window.scrollTo(0, 0);
    refresh();
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
  refresh();
})();
