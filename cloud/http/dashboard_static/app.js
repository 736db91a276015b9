// kgpu dashboard: a single-page app over the controller's JSON API. Plain JS, no build step; the
// one library is uPlot (vendored: uPlot.iife.min.js, see VENDORED.md) for the time-series charts.
// Every piece of data reaches the page through textContent / setAttribute: never as HTML markup.
// The overview and the banner follow the controller's server push (GET /api/v1/dashboard/stream,
// Server-Sent Events read through fetch so that a bearer token can go with it); the other pages
// are read again when a snapshot arrives, at most every OTHER_REFRESH_MS.
"use strict";

(() => {
  const RETRY_MS = 2000; // reconnect the stream this long after it failed
  const OTHER_REFRESH_MS = 10000; // pages other than the overview are read again at most this often
  const CHART_POINTS = 1500; // samples asked for per GPU and chart range
  const THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80; // slowdowns, not idle or application clocks
  const THROTTLE_NAMES = [[0x4, "power cap"], [0x8, "HW slowdown"], [0x20, "SW thermal"],
    [0x40, "HW thermal"], [0x80, "power brake"]];
  const RANGES = [["15m", 900], ["30m", 1800], ["1h", 3600], ["6h", 21600], ["24h", 86400], ["7d", 604800], ["30d", 2592000]];
  const DEFAULT_THERMAL = { maxTempC: 83, criticalTempC: 90 }; // PowerPolicy's defaults (shared/policy.py)
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

  // A GPU's vendor (an edge older than the device layer sends none: NVIDIA on NVML; a GPU seen only
  // in telemetry has no status yet, so no name and no vendor) and its badge: "amd", "nvidia jetson-orin".
  const vendorOf = (g) => g.vendor || (g.name ? "nvidia" : null);
  const vendorText = (g) => [vendorOf(g), g.platform].filter(Boolean).join(" ");
  const vendorBadge = (g) => (vendorOf(g) ? el("span", { class: `pill vendor v-${vendorOf(g)}`, dataset: { vendor: vendorOf(g) },
    title: g.resource_name ? `advertised as ${g.resource_name}` : "" }, vendorText(g)) : null);
  const nodeVendors = (n) => [...new Map((n.gpus || []).filter(vendorOf).map((g) => [vendorText(g), g])).values()];

  // ---- shared pieces -----------------------------------------------------------------------

  function throttleReasons(mask) {
    if (!isNum(mask) || !(mask & THROTTLE_MASK)) return [];
    return THROTTLE_NAMES.filter(([bit]) => mask & bit).map(([, name]) => name);
  }
  const throttledPill = (reasons) => (reasons.length
    ? el("span", { class: "pill throttled", title: `clocks held down: ${reasons.join(", ")}` }, "throttled") : null);

  function gpuTile(gpu, online, throttled) {
    const s = gpu.sample || {};
    const reasons = throttled || throttleReasons(s.throttle_reasons);
    const health = healthOf(gpu.health);
    const limit = isNum(s.power_limit_w) ? s.power_limit_w : gpu.power_limit_w;
    const util = isNum(s.utilization_pct) ? Math.max(0, Math.min(100, s.utilization_pct)) : null;
    return el("div", {
      class: `gpu health-${health}${online === false ? " stale" : ""}${reasons.length ? " is-throttled" : ""}`,
      dataset: { health, uuid: gpu.uuid, index: gpu.index, throttled: reasons.length ? "1" : "0" },
      title: `${gpu.name || "GPU"} ${gpu.uuid}\nhealth: ${gpu.health || "unknown"}` +
        (reasons.length ? `\nthrottled: ${reasons.join(", ")}` : ""),
    },
      el("div", { class: "gpu-head" }, el("span", { class: "gpu-idx" }, `GPU ${gpu.index}`),
        throttledPill(reasons), el("span", { class: `health-label ${health}` }, health)),
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

  // A value of a step, a pod or a policy as readable text: key: value pairs, never a JSON blob.
  function readable(value, depth = 0) {
    if (value === null || value === undefined) return "—";
    if (typeof value !== "object") return String(value);
    if (Array.isArray(value)) return value.map((v) => readable(v, depth + 1)).join(", ");
    const parts = Object.entries(value).map(([k, v]) =>
      (v && typeof v === "object" && !Array.isArray(v) && depth < 2 ? `${k} (${readable(v, depth + 1)})` : `${k}: ${readable(v, depth + 1)}`));
    return parts.join("; ");
  }
  // A nested object as rows of a key / value table (policies), dotted keys for the nesting.
  function flatten(value, prefix = "", out = []) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
    } else out.push([prefix, Array.isArray(value) ? value.join(", ") : readable(value)]);
    return out;
  }

  function migrationRows(m) {
    const steps = Array.isArray(m.steps) ? m.steps : [];
    const pods = Object.entries(m.pods || {});
    const main = el("tr", { class: "migration", dataset: { id: m.id, state: m.state } },
      el("td", {}, el("strong", {}, `#${m.id}`)),
      el("td", {}, pill(m.state, `mig-${m.state}`)),
      el("td", {}, nodeLink(m.node), m.subjects && m.subjects.length ? el("div", { class: "muted small" }, m.subjects.join(", ")) : null),
      el("td", {}, m.trigger || "—"),
      el("td", { class: "wrap" }, m.reason || ""),
      el("td", { class: "nowrap" }, clock(m.created_at)),
      el("td", { class: "nowrap" }, clock(m.updated_at)));
    const detail = el("tr", { class: "steps-row", dataset: { id: m.id } }, el("td", { colspan: 7 },
      el("details", { open: steps.length <= 6 ? true : null },
        el("summary", {}, `${steps.length} step${steps.length === 1 ? "" : "s"}${pods.length ? `, ${pods.length} pod${pods.length === 1 ? "" : "s"}` : ""}`),
        steps.length
          ? el("table", { class: "steps" }, el("thead", {}, el("tr", {}, ["At", "Step", "Outcome", "Detail"].map((h) => el("th", {}, h)))),
            el("tbody", {}, steps.map((step) => el("tr", {},
              el("td", { class: "nowrap muted" }, clock(step.at)),
              el("td", {}, el("strong", {}, step.step || "step")),
              el("td", {}, step.outcome ? pill(step.outcome, `out-${step.outcome}`) : "—"),
              el("td", { class: "wrap" }, step.detail ? readable(step.detail) : "")))))
          : el("p", { class: "muted small" }, "no steps taken yet"),
        pods.length
          ? el("table", { class: "steps pods" }, el("thead", {}, el("tr", {}, el("th", {}, "Pod"), el("th", {}, "State"))),
            el("tbody", {}, pods.map(([pod, what]) => el("tr", {}, el("td", { class: "mono" }, pod), el("td", { class: "wrap" }, readable(what))))))
          : null)));
    return [main, detail];
  }

  function migrationTable(rows) {
    return el("div", { class: "table-wrap" }, el("table", { class: "list", id: "migrations" },
      el("thead", {}, el("tr", {}, ["#", "State", "Node", "Trigger", "Reason", "Created", "Updated"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map(migrationRows))));
  }

  // ---- charts (uPlot) ----------------------------------------------------------------------

  const COLORS = { temp: "#d9480f", max: "#f59f00", critical: "#c92a2a", power: "#1971c2", limit: "#5f3dc4",
    util: "#2b8a3e", memutil: "#66a80f", mem: "#0c8599", total: "#868e96", sm: "#ae3ec9", memclk: "#e8590c",
    online: "#2b8a3e", offline: "#c92a2a", unhealthy: "#e67700", throttled: "#862e9c", fleetpower: "#1971c2",
    hottest: "#d9480f" };
  const charts = new Set(); // live uPlot instances, resized with the window and destroyed with their view

  // Time labels on one line: seconds for a short span, minutes, or the day and hour for days.
  function timeLabels(u, splits) {
    const span = u.scales.x.max - u.scales.x.min;
    return splits.map((v) => {
      const d = new Date(v * 1000);
      if (span > 2 * 86400) return `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${d.toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit" })}`;
      return d.toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit", second: span <= 900 ? "2-digit" : undefined });
    });
  }
  function timeAxis() {
    return { stroke: "#495057", font: "12px system-ui, sans-serif", grid: { stroke: "#e9ecef" }, ticks: { stroke: "#dee2e6" },
      values: timeLabels, space: 70 };
  }
  function valueAxis(label) {
    return { stroke: "#495057", font: "12px system-ui, sans-serif", label, labelFont: "12px system-ui, sans-serif",
      labelSize: 18, size: 52, grid: { stroke: "#e9ecef" }, ticks: { stroke: "#dee2e6" } };
  }

  // One chart: xs (unix seconds) and series [{label, color, values, dash, step}], in a figure whose
  // data-points says how many points it draws (the tests read it). Unknown values are null: gaps.
  function timeChart({ id, title, unit, xs, series, yMin, yMax, syncKey, height = 180, none = "no samples in this range" }) {
    const drawn = series.filter((s) => s.values.some(isNum));
    const figure = el("figure", { class: "chart-box", dataset: { chart: id, points: xs.length } },
      el("figcaption", {}, title, unit ? el("span", { class: "muted" }, ` (${unit})`) : null));
    if (typeof uPlot !== "function") { figure.append(el("p", { class: "muted small" }, "charting library missing")); return figure; }
    if (!xs.length || !drawn.length) {
      figure.dataset.points = "0";
      figure.append(el("div", { class: "chart-empty" }, none));
      return figure;
    }
    const holder = el("div", { class: "chart" });
    figure.append(holder);
    const opts = {
      width: 400, height,
      cursor: syncKey ? { sync: { key: syncKey } } : {},
      // the legend shows the latest values while the cursor is off the chart
      hooks: { ready: [latestInLegend], setCursor: [(u) => { if (u.cursor.idx == null) latestInLegend(u); }] },
      legend: { show: true, live: true },
      // a few seconds of data (a fresh trend, a new node): a minute of axis rather than years
      scales: { x: xs[xs.length - 1] - xs[0] < 60 ? { time: true, auto: false, min: xs[xs.length - 1] - 60, max: xs[xs.length - 1] + 2 }
        : { time: true }, y: { range: (u, lo, hi) => {
        let a = isNum(yMin) ? Math.min(yMin, lo) : lo, b = isNum(yMax) ? Math.max(yMax, hi) : hi;
        if (!isNum(a) || !isNum(b)) { a = 0; b = 1; }
        if (a === b) { a -= 1; b += 1; }
        const pad = (b - a) * 0.08;
        return [isNum(yMin) && a >= yMin ? a : a - pad, b + pad];
      } } },
      axes: [timeAxis(), valueAxis(unit || "")],
      series: [{ value: (u, v) => (v == null ? "—" : clock(v)) },
        ...drawn.map((s) => ({ label: s.label, stroke: s.color, width: s.width || 1.5, dash: s.dash,
          spanGaps: false, points: { show: xs.length < 60, size: 4 },
          paths: s.step && uPlot.paths && uPlot.paths.stepped ? uPlot.paths.stepped({ align: 1 }) : undefined,
          value: (u, v) => (v == null ? "—" : `${+v.toFixed(s.digits ?? 1)}${unit ? ` ${unit}` : ""}`) }))],
    };
    const data = [xs, ...drawn.map((s) => s.values.map((v) => (isNum(v) ? v : null)))];
    // uPlot needs the holder in the document to measure it: create once the view is shown
    requestAnimationFrame(() => {
      if (!holder.isConnected) return;
      opts.width = Math.max(240, holder.clientWidth || 400);
      const chart = new uPlot(opts, data, holder);
      chart.kgpuHolder = holder;
      charts.add(chart);
      figure.dataset.drawn = "1";
    });
    return figure;
  }

  function latestInLegend(u) {
    const n = u.data[0].length;
    if (n && u.legend && u.legend.values) {
      u.series.forEach((series, i) => {
        if (!u.legend.values[i]) return;
        const v = u.data[i][n - 1];
        u.legend.values[i]._ = series.value(u, v, i, n - 1);
      });
      const cells = u.root.querySelectorAll(".u-legend .u-series .u-value");
      cells.forEach((cell, i) => { if (u.legend.values[i]) cell.textContent = u.legend.values[i]._; });
    }
  }

  function destroyCharts() {
    for (const chart of charts) chart.destroy();
    charts.clear();
  }
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      for (const chart of charts) {
        if (!chart.kgpuHolder.isConnected) { chart.destroy(); charts.delete(chart); continue; }
        chart.setSize({ width: Math.max(240, chart.kgpuHolder.clientWidth), height: chart.height });
      }
    }, 150);
  });

  function column(rows, field, scale = 1) {
    return rows.map((r) => (isNum(r[field]) ? r[field] / scale : null));
  }

  // ---- overview (from the stream's snapshots) ----------------------------------------------

  const overviewState = { q: "", filter: "all", sort: "name", vendor: "all" };
  let latest = null; // the last snapshot
  let trendShown = -1; // points in the trend charts on the page

  const stat = (label, value, cls, key) => el("div", { class: `stat ${cls || ""}`, dataset: { stat: key || label } },
    el("div", { class: "stat-value" }, value), el("div", { class: "stat-label" }, label));

  function throttledIndex(snap) {
    const map = new Map();
    for (const g of snap.throttled || []) map.set(`${g.node}/${g.uuid}`, throttleReasons(g.throttle_reasons));
    return map;
  }

  const nodeHealth = (n) => (n.gpus || []).some((g) => healthOf(g.health) !== "healthy" && healthOf(g.health) !== "unknown");
  const nodeMax = (n, field) => Math.max(-Infinity, ...(n.gpus || []).map((g) => (g.sample && isNum(g.sample[field]) ? g.sample[field] : -Infinity)));
  const nodePower = (n) => (n.gpus || []).reduce((t, g) => t + (g.sample && isNum(g.sample.power_w) ? g.sample.power_w : 0), 0);

  const FILTERS = [["all", "all nodes"], ["online", "online"], ["offline", "offline"], ["unhealthy", "with an unhealthy GPU"],
    ["throttled", "with a throttled GPU"], ["over-budget", "over budget"], ["degraded", "degraded"]];
  const VENDORS = [["all", "all vendors"], ["nvidia", "NVIDIA"], ["amd", "AMD"], ["intel", "Intel"]];
  const SORTS = [["name", "name"], ["problems", "problems first"], ["temp", "hottest first"], ["power", "most power first"],
    ["util", "busiest first"], ["seen", "least recently seen first"]];

  function visibleNodes(snap, throttled) {
    const q = overviewState.q.trim().toLowerCase();
    const isThrottled = (n) => (n.gpus || []).some((g) => throttled.has(`${n.name}/${g.uuid}`));
    const keep = {
      all: () => true, online: (n) => n.online, offline: (n) => !n.online, unhealthy: nodeHealth,
      throttled: isThrottled, "over-budget": (n) => Boolean(n.over_budget),
      degraded: (n) => (Array.isArray(n.degraded) ? n.degraded.length : Boolean(n.degraded && Object.keys(n.degraded).length)),
    }[overviewState.filter] || (() => true);
    const ofVendor = (n) => overviewState.vendor === "all" || (n.gpus || []).some((g) => vendorOf(g) === overviewState.vendor);
    const matches = (n) => !q || n.name.toLowerCase().includes(q) ||
      Object.entries(n.labels || {}).some(([k, v]) => `${k}=${v}`.toLowerCase().includes(q)) ||
      (n.gpus || []).some((g) => `${g.uuid} ${g.name || ""} ${vendorText(g)}`.toLowerCase().includes(q));
    const score = (n) => (!n.online ? 3 : 0) + (nodeHealth(n) ? 2 : 0) + (isThrottled(n) ? 1 : 0) + (n.over_budget ? 1 : 0);
    const by = {
      name: (a, b) => a.name.localeCompare(b.name),
      problems: (a, b) => score(b) - score(a) || a.name.localeCompare(b.name),
      temp: (a, b) => nodeMax(b, "temperature_c") - nodeMax(a, "temperature_c") || a.name.localeCompare(b.name),
      power: (a, b) => nodePower(b) - nodePower(a) || a.name.localeCompare(b.name),
      util: (a, b) => nodeMax(b, "utilization_pct") - nodeMax(a, "utilization_pct") || a.name.localeCompare(b.name),
      seen: (a, b) => (a.last_seen || 0) - (b.last_seen || 0) || a.name.localeCompare(b.name),
    }[overviewState.sort] || ((a, b) => a.name.localeCompare(b.name));
    return (snap.nodes || []).filter((n) => keep(n) && ofVendor(n) && matches(n)).sort(by);
  }

  function gpuList(id, title, rows, why, emptyText) {
    return el("section", { class: "card list-card", id },
      el("h2", {}, title),
      rows.length ? el("table", { class: "list compact" },
        el("thead", {}, el("tr", {}, ["Node", "GPU", "Temp", "Power / limit", "Util", why ? "Why" : "Health"].map((h) => el("th", {}, h)))),
        el("tbody", {}, rows.map((g) => el("tr", { dataset: { node: g.node, uuid: g.uuid } },
          el("td", {}, nodeLink(g.node)),
          el("td", {}, `GPU ${g.index}`),
          el("td", { class: `temp ${tempClass(g.temperature_c)}` }, num(g.temperature_c, 0, " °C")),
          el("td", {}, `${num(g.power_w, 0)} / ${num(g.power_limit_w, 0, " W")}`),
          el("td", {}, num(g.utilization_pct, 0, "%")),
          el("td", {}, why ? why(g) : pill(healthOf(g.health), `h-${healthOf(g.health)}`))))))
        : el("p", { class: "muted small" }, emptyText));
  }

  function overviewSkeleton() {
    const search = el("input", { id: "search", type: "search", placeholder: "search nodes, labels, GPU UUIDs, vendors",
      "aria-label": "search nodes", value: overviewState.q, autocomplete: "off" });
    const filter = el("select", { id: "filter", "aria-label": "filter nodes" },
      FILTERS.map(([v, label]) => el("option", { value: v, selected: v === overviewState.filter }, label)));
    const vendor = el("select", { id: "vendor", "aria-label": "filter nodes by GPU vendor" },
      VENDORS.map(([v, label]) => el("option", { value: v, selected: v === overviewState.vendor }, label)));
    const sort = el("select", { id: "sort", "aria-label": "sort nodes" },
      SORTS.map(([v, label]) => el("option", { value: v, selected: v === overviewState.sort }, `sort: ${label}`)));
    search.addEventListener("input", () => { overviewState.q = search.value; if (latest) { renderNodes(latest); searchWhole(); } });
    filter.addEventListener("change", () => { overviewState.filter = filter.value; if (latest) renderNodes(latest); });
    vendor.addEventListener("change", () => { overviewState.vendor = vendor.value; if (latest) renderNodes(latest); });
    sort.addEventListener("change", () => { overviewState.sort = sort.value; if (latest) renderNodes(latest); });
    trendShown = -1;
    return [
      el("div", { id: "overview" },
        el("h1", {}, "Fleet"),
        el("section", { class: "stats", id: "fleet-stats" }),
        el("section", { class: "trend", id: "fleet-trend" }),
        el("div", { class: "lists", id: "fleet-lists" }),
        el("h2", {}, "Nodes"),
        el("div", { class: "toolbar" }, search, filter, vendor, sort, el("span", { class: "muted small", id: "shown" })),
        el("div", { id: "nodes-wrap" })),
    ];
  }

  function renderTrend(snap) {
    const trend = snap.trend || { points: [] };
    const points = trend.points || [];
    if (points.length === trendShown) return;
    trendShown = points.length;
    const at = (name) => trend.fields.indexOf(name);
    const xs = points.map((p) => p[0]);
    const col = (name) => points.map((p) => p[at(name)]);
    const box = document.getElementById("fleet-trend");
    for (const chart of charts) if (box.contains(chart.kgpuHolder)) { chart.destroy(); charts.delete(chart); }
    box.replaceChildren(
      timeChart({ id: "trend-nodes", title: "Nodes and GPUs", unit: "", xs, height: 150, yMin: 0, series: [
        { label: "online", color: COLORS.online, values: col("online"), digits: 0 },
        { label: "offline", color: COLORS.offline, values: col("offline"), digits: 0 },
        { label: "unhealthy GPUs", color: COLORS.unhealthy, values: col("unhealthy_gpus"), digits: 0 },
        { label: "throttled GPUs", color: COLORS.throttled, values: col("throttled"), digits: 0 }] }),
      timeChart({ id: "trend-power", title: "Fleet power", unit: "W", xs, height: 150, yMin: 0, series: [
        { label: "power", color: COLORS.fleetpower, values: col("power_w"), digits: 0 }] }),
      timeChart({ id: "trend-hottest", title: "Hottest GPU", unit: "°C", xs, height: 150, series: [
        { label: "hottest", color: COLORS.hottest, values: col("hottest_c"), digits: 0 }] }));
  }

  // A fleet larger than the snapshot (its first STREAM_NODES by name): a search asks the controller
  // for the matching nodes of the whole fleet (`GET /api/v1/dashboard/fleet?q=`), again with every
  // snapshot while the search stands, and the table shows those.
  const whole = { q: "", nodes: null, more: false, timer: null };

  function searchWhole() {
    clearTimeout(whole.timer);
    const q = overviewState.q.trim();
    if (!q || !(latest && latest.nodes_truncated)) { whole.q = ""; whole.nodes = null; return; }
    whole.timer = setTimeout(async () => {
      try {
        const found = await api(`/api/v1/dashboard/fleet?q=${encodeURIComponent(q)}&limit=500&gpu_limit=16`);
        if (overviewState.q.trim() !== q) return; // typed on meanwhile
        Object.assign(whole, { q, nodes: found.nodes || [], more: Boolean(found.next_cursor) });
        if (latest && document.getElementById("nodes-wrap")) renderNodes(latest);
      } catch (_) { /* the snapshot's own nodes stay shown; the next snapshot tries again */ }
    }, 250);
  }

  function renderNodes(fromStream) {
    const searched = fromStream.nodes_truncated && whole.nodes !== null && whole.q === overviewState.q.trim();
    const snap = searched ? { ...fromStream, nodes: whole.nodes } : fromStream;
    const throttled = throttledIndex(snap);
    const nodes = visibleNodes(snap, throttled);
    const now = isNum(snap.generated_at) ? snap.generated_at : nowS();
    const all = (snap.nodes || []).length;
    const fleetSize = (snap.summary || {}).nodes;
    document.getElementById("shown").textContent = searched
      ? `${nodes.length} nodes shown: the whole fleet's ${all}${whole.more ? " first" : ""} matches of ${fleetSize} nodes`
      : `${nodes.length} of ${all} nodes shown` +
        (snap.nodes_truncated ? ` (the first ${all} of ${fleetSize} by name; a search covers the whole fleet)` : "");
    const wrap = document.getElementById("nodes-wrap");
    if (!all) {
      wrap.replaceChildren(empty("No nodes have reported yet.",
        "Nodes appear here once an edge daemon (kgpu edge run --mqtt …) sends its first status."));
      return;
    }
    if (!nodes.length) { wrap.replaceChildren(empty("No node matches.", "Change the search or the filter.")); return; }
    wrap.replaceChildren(el("div", { class: "table-wrap" }, el("table", { class: "nodes", id: "nodes-table" },
      el("thead", {}, el("tr", {}, ["Node", "State", "Vendor", "GPUs", "Last seen", "Outbox", "Policy", "Version"]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, nodes.map((n) => {
        const degraded = Array.isArray(n.degraded) ? n.degraded : n.degraded ? Object.keys(n.degraded) : [];
        return el("tr", { class: n.online ? "online" : "offline", dataset: { node: n.name } },
          el("td", { class: "node-name" }, nodeLink(n.name),
            n.over_budget ? el("div", { class: "chips" }, pill(`over budget: ${short(n.over_budget, 40)}`, "bad over-budget")) : null,
            degraded.length ? el("div", { class: "chips" }, degraded.map((d) => pill(short(d, 60), "warn"))) : null),
          el("td", {}, pill(n.online ? "online" : "offline", n.online ? "good" : "bad")),
          el("td", { class: "vendors" }, nodeVendors(n).length ? el("div", { class: "chips" }, nodeVendors(n).map(vendorBadge))
            : el("span", { class: "muted" }, "—")),
          el("td", {}, (n.gpus || []).length
            ? el("div", { class: "gpus" }, n.gpus.map((g) => gpuTile(g, n.online, throttled.get(`${n.name}/${g.uuid}`) || [])),
              n.gpus_truncated ? el("span", { class: "muted small" }, `+${(n.gpu_summary || {}).count - n.gpus.length} more`) : null)
            : el("span", { class: "muted" }, "no GPUs reported")),
          el("td", { title: clock(n.last_seen), class: "nowrap" }, ago(now - n.last_seen)),
          el("td", { class: n.outbox_depth > 0 ? "warn-text" : "" }, n.outbox_depth ?? "—"),
          el("td", {}, n.policy_name ? `${n.policy_name} v${n.policy_version ?? "?"}`
            : isNum(n.policy_version) ? `v${n.policy_version}` : "—"),
          el("td", {}, n.daemon_version || "—"));
      })))));
  }

  function renderOverview(snap) {
    if (!document.getElementById("overview")) {
      destroyCharts();
      document.getElementById("main").replaceChildren(...overviewSkeleton());
    }
    if (snap.stale && !snap.summary) return; // the database is down: keep what is shown, the banner says why
    const sum = snap.summary || {};
    const total = sum.nodes ?? 0, online = sum.online ?? 0, bad = sum.unhealthy_gpus ?? 0;
    document.getElementById("fleet-stats").replaceChildren(
      stat("nodes", total, "", "nodes"),
      stat("online", online, online ? "good" : "", "online"),
      stat("offline", total - online, total - online ? "bad" : "", "offline"),
      stat("GPUs", sum.gpus ?? 0, "", "gpus"),
      stat("unhealthy GPUs", bad, bad ? "bad" : "good", "unhealthy"),
      stat("throttled GPUs", sum.throttled ?? 0, sum.throttled ? "warn" : "good", "throttled"),
      stat("fleet power", `${num(sum.power_w ?? 0, 0)} W`, "", "power"),
      ...(sum.over_budget ? [stat("over budget", sum.over_budget, "bad", "over-budget")] : []));
    renderTrend(snap);
    const throttled = snap.throttled || [];
    const attention = [...(snap.attention || [])];
    for (const g of throttled) if (!attention.some((a) => a.node === g.node && a.uuid === g.uuid)) attention.push(g);
    document.getElementById("fleet-lists").replaceChildren(
      gpuList("hottest", "Hottest GPUs", snap.hottest || [], null, "no temperatures reported yet"),
      gpuList("attention", "Needs attention", attention.slice(0, 12), (g) => el("span", {},
        healthOf(g.health) !== "healthy" ? pill(healthOf(g.health), `h-${healthOf(g.health)}`) : null,
        throttledPill(throttleReasons(g.throttle_reasons)),
        throttleReasons(g.throttle_reasons).length ? el("span", { class: "muted small" }, ` ${throttleReasons(g.throttle_reasons).join(", ")}`) : null),
      "every GPU is healthy and none is throttled"));
    renderNodes(snap);
    if (overviewState.q.trim() && snap.nodes_truncated) searchWhole(); // the matches' figures follow the stream
    document.body.dataset.ready = "overview";
  }

  // ---- policies: the settings in words, and every setting in a key / value table ------------

  function policySummary(policy) {
    const pick = (o, ...names) => { for (const n of names) if (o && o[n] !== undefined) return o[n]; return undefined; };
    const t = pick(policy, "thermalThrottling", "thermal_throttling") || {};
    const ps = pick(policy, "powerSaving", "power_saving") || {};
    const cap = pick(policy, "powerCapWatts", "power_cap_watts");
    const lines = [];
    if (t.enabled === false) lines.push("thermal throttling off");
    else if (Object.keys(t).length) {
      lines.push(`thermal: step ${pick(t, "stepPercent", "step_percent") ?? "?"} % down every ${pick(t, "stepInterval", "step_interval") ?? "?"} s ` +
        `above ${pick(t, "maxTempC", "max_temp_c") ?? "?"} °C (critical ${pick(t, "criticalTempC", "critical_temp_c") ?? "?"} °C)`);
    }
    if (ps.enabled) {
      lines.push(`power saving: below ${pick(ps, "utilizationThreshold", "utilization_threshold") ?? "?"} % for ` +
        `${pick(ps, "sustainPeriod", "sustain_period") ?? "?"} s → ${pick(ps, "capPercent", "cap_percent") ?? "?"} % of the default limit`);
    }
    if (isNum(cap)) lines.push(`power cap: ${cap} W`);
    const rows = flatten(policy);
    return el("div", {},
      lines.length ? el("ul", { class: "plain" }, lines.map((l) => el("li", {}, l))) : el("span", { class: "muted" }, "defaults"),
      el("details", {}, el("summary", { class: "small" }, `all ${rows.length} settings`),
        el("table", { class: "kv" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))))));
  }

  // ---- node page: a GPU's charts over a chosen range ---------------------------------------

  // Seconds of history the node page charts: by default well inside the cloud's raw tier (every
  // sample for the last hour by default), so that the charts have a point per sampling interval.
  let nodeRange = 1800;

  function thermalOf(node, policies) {
    const found = policies.find((p) => p.name === node.policy_name && p.policy);
    const t = found ? (found.policy.thermalThrottling || found.policy.thermal_throttling || {}) : {};
    const max = t.maxTempC ?? t.max_temp_c, critical = t.criticalTempC ?? t.critical_temp_c;
    return { maxTempC: isNum(max) ? max : DEFAULT_THERMAL.maxTempC, criticalTempC: isNum(critical) ? critical : DEFAULT_THERMAL.criticalTempC,
      source: found ? `policy ${found.name}` : "the default policy" };
  }

  function rangePicker(resolution, thermal) {
    return el("div", { class: "toolbar range", id: "range" },
      el("span", { class: "muted" }, "range"),
      RANGES.map(([label, seconds]) => {
        const b = el("button", { type: "button", class: seconds === nodeRange ? "active" : "", dataset: { range: label } }, label);
        b.addEventListener("click", () => { nodeRange = seconds; lastRender = 0; show(); });
        return b;
      }),
      el("span", { class: "muted small" }, isNum(resolution)
        ? (resolution > 0 ? `one point per ${resolution >= 60 ? `${+(resolution / 60).toFixed(1)} min (means)` : `${resolution} s`}` : "every sample")
        : ""),
      el("span", { class: "muted small" }, ` · maxTempC ${thermal.maxTempC} °C, critical ${thermal.criticalTempC} °C (${thermal.source})`));
  }

  function gpuCard(g, node, rows, thermal) {
    const xs = rows.map((r) => r.ts);
    const flat = (v) => rows.map(() => v);
    const memTotal = isNum(g.memory_total_bytes) ? g.memory_total_bytes : null;
    const reasons = throttleReasons(g.sample && g.sample.throttle_reasons);
    const key = `gpu-${g.uuid}`;
    const clocks = [{ label: "SM clock", color: COLORS.sm, values: column(rows, "sm_clock_mhz"), digits: 0 },
      { label: "memory clock", color: COLORS.memclk, values: column(rows, "memory_clock_mhz"), digits: 0 }];
    const s = g.sample || {};
    return el("section", { class: `card gpu-card health-${healthOf(g.health)}`, dataset: { uuid: g.uuid, throttled: reasons.length ? "1" : "0" } },
      el("div", { class: "card-head" }, el("strong", {}, `GPU ${g.index}`), " ",
        el("span", { class: "muted" }, g.name || ""), vendorBadge(g), pill(healthOf(g.health), `h-${healthOf(g.health)}`),
        throttledPill(reasons), reasons.length ? el("span", { class: "muted small" }, reasons.join(", ")) : null,
        el("span", { class: "muted small right mono" }, g.uuid)),
      gpuTile(g, node.online),
      el("p", { class: "muted small" }, `now: SM ${num(s.sm_clock_mhz, 0, " MHz")}, memory ${num(s.memory_clock_mhz, 0, " MHz")}, ` +
        `memory used ${num(isNum(s.memory_used_bytes) ? s.memory_used_bytes / 2 ** 30 : null, 1, " GiB")}` +
        (memTotal ? ` of ${num(memTotal / 2 ** 30, 1, " GiB")}` : "")),
      el("div", { class: "charts" },
        timeChart({ id: "temperature", title: "Temperature", unit: "°C", xs, syncKey: key, series: [
          { label: "temperature", color: COLORS.temp, values: column(rows, "temperature_c"), width: 2, digits: 0 },
          { label: "maxTempC", color: COLORS.max, values: flat(thermal.maxTempC), dash: [6, 4], digits: 0 },
          { label: "critical", color: COLORS.critical, values: flat(thermal.criticalTempC), dash: [2, 3], digits: 0 }] }),
        timeChart({ id: "power", title: "Power against its limit", unit: "W", xs, yMin: 0, syncKey: key, series: [
          { label: "power", color: COLORS.power, values: column(rows, "power_w"), width: 2, digits: 0 },
          { label: "limit", color: COLORS.limit, values: column(rows, "power_limit_w"), dash: [6, 4], step: true, digits: 0 }] }),
        timeChart({ id: "utilization", title: "Utilisation", unit: "%", xs, yMin: 0, yMax: 100, syncKey: key, series: [
          { label: "GPU", color: COLORS.util, values: column(rows, "utilization_pct"), width: 2, digits: 0 },
          { label: "memory", color: COLORS.memutil, values: column(rows, "memory_util_pct"), digits: 0 }] }),
        timeChart({ id: "memory", title: "Memory used", unit: "GiB", xs, yMin: 0, syncKey: key, series: [
          { label: "used", color: COLORS.mem, values: column(rows, "memory_used_bytes", 2 ** 30), width: 2 },
          { label: "total", color: COLORS.total, values: flat(memTotal ? memTotal / 2 ** 30 : null), dash: [6, 4] }] }),
        timeChart({ id: "clocks", title: "Clocks", unit: "MHz", xs, yMin: 0, syncKey: key, series: clocks,
          none: `no clock readings in this range (an edge older than the clock history sends none); now: SM ${num(s.sm_clock_mhz, 0, " MHz")}, ` +
            `memory ${num(s.memory_clock_mhz, 0, " MHz")}` })));
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
      default: return readable(b);
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
    const until = nowS();
    const since = until - nodeRange;
    const gpusShown = node.gpus || [];
    const [histories, events, decisions, migrations, policies] = await Promise.all([
      Promise.all(gpusShown.map((g) => api(`/api/v1/nodes/${q}/samples?gpu=${encodeURIComponent(g.uuid)}` +
        `&uuid=${encodeURIComponent(g.uuid)}&since=${since.toFixed(3)}&until=${until.toFixed(3)}&limit=${CHART_POINTS}`))),
      api(`/api/v1/events?node=${q}&limit=200`),
      api(`/api/v1/decisions?node=${q}&limit=200`),
      api(`/api/v1/migrations?node=${q}&limit=20`).catch(() => ({ migrations: [] })),
      api("/api/v1/policies").catch(() => ({ policies: [] })),
    ]);
    const byGpu = new Map();
    let resolution = null;
    histories.forEach((h, i) => {
      if (isNum(h.resolution_s)) resolution = h.resolution_s;
      byGpu.set(gpusShown[i].uuid, (h.samples || []).filter((s) => s.uuid === undefined || s.uuid === gpusShown[i].uuid)
        .sort((a, b) => a.ts - b.ts));
    });
    const thermal = thermalOf(node, policies.policies || []);
    const labels = Object.entries(node.labels || {});
    const view = [
      el("p", { class: "crumbs" }, el("a", { href: "#/" }, "Fleet"), " / ", name),
      el("h1", {}, name, " ", pill(node.online ? "online" : "offline", node.online ? "good" : "bad"),
        node.over_budget ? pill(`over budget: ${short(node.over_budget, 40)}`, "bad over-budget") : null),
      el("dl", { class: "facts" },
        [["last seen", `${ago(nowS() - node.last_seen)} (${clock(node.last_seen)})`],
          ["daemon", node.daemon_version || "—"],
          ["vendor", nodeVendors(node).map(vendorText).join(", ") || "—"],
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
    view.push(rangePicker(resolution, thermal));
    const grid = el("div", { class: "gpu-cards" });
    for (const g of gpus) {
      const rows = (byGpu.get(g.uuid) || []).slice();
      // end the lines at the latest sample the controller holds
      if (g.sample && isNum(g.sample.ts) && g.sample.ts >= since && (!rows.length || g.sample.ts > rows[rows.length - 1].ts)) rows.push(g.sample);
      grid.append(gpuCard(g, node, rows, thermal));
    }
    view.push(grid);

    const migs = migrations.migrations || [];
    if (migs.length) view.push(el("h2", {}, "Migrations"), migrationTable(migs));

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
    view.push(rows.length ? migrationTable(rows)
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
    view.push(el("div", { class: "table-wrap" }, el("table", { class: "list", id: "rollouts" },
      el("thead", {}, el("tr", {}, ["#", "State", "Version", "Wave", "Nodes", "Created", "Reason"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((r) => el("tr", {},
        el("td", {}, el("a", { href: `#/rollouts/${encodeURIComponent(r.id)}` }, `#${r.id}`)),
        el("td", {}, pill(r.state, `ro-${r.state}`)),
        el("td", {}, r.version || "—", r.image ? el("div", { class: "muted small mono" }, r.image) : null),
        el("td", {}, `${r.wave ?? "—"} / ${r.waveCount ?? "—"}`),
        el("td", { class: "histo-cell" }, histogram(r.counts, r.nodeCount)),
        el("td", {}, clock(r.createdAt)),
        el("td", { class: "wrap" }, r.reason || "")))))));
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
      nodes.length ? el("div", { class: "table-wrap" }, el("table", { class: "list", id: "rollout-nodes" },
        el("thead", {}, el("tr", {}, ["Node", "State", "Wave", "Online", "Version", "From", "Since", "Reason"].map((h) => el("th", {}, h)))),
        el("tbody", {}, nodes.map((n) => el("tr", {},
          el("td", {}, nodeLink(n.node), n.canary ? pill("canary", "label") : null, n.reverting ? pill("reverting", "warn") : null),
          el("td", {}, pill(n.state, `st-${n.state}`)),
          el("td", {}, n.wave ?? "—"),
          el("td", {}, n.online === null ? "—" : pill(n.online ? "online" : "offline", n.online ? "good" : "bad")),
          el("td", {}, n.daemonVersion || "—"),
          el("td", {}, n.fromVersion || "—"),
          el("td", {}, clock(n.since)),
          el("td", { class: "wrap" }, n.reason || ""))))))
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
    view.push(el("div", { class: "table-wrap" }, el("table", { class: "list", id: "policies" },
      el("thead", {}, el("tr", {}, ["Name", "Valid", "Priority", "Node selector", "Policy", "Generation", "Status", "Updated"].map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((p) => el("tr", {},
        el("td", {}, el("strong", {}, p.name)),
        el("td", {}, pill(p.valid ? "valid" : "invalid", p.valid ? "good" : "bad"),
          p.valid ? null : el("div", { class: "small bad-text" }, p.reason || "",
            (p.errors || []).map((e) => el("div", {}, readable(e))))),
        el("td", {}, p.priority ?? "—"),
        el("td", {}, Object.keys(p.node_selector || {}).length
          ? el("div", { class: "chips" }, Object.entries(p.node_selector).map(([k, v]) => pill(`${k}=${short(v, 60)}`, "label")))
          : el("span", { class: "muted" }, "every node")),
        el("td", { class: "policy-cell" }, p.policy ? policySummary(p.policy) : "—"),
        el("td", {}, p.generation ?? "—"),
        el("td", { class: "small wrap" }, Object.keys(p.status || {}).length ? readable(p.status) : "—"),
        el("td", { class: "nowrap" }, clock(p.updated_at))))))));
    return view;
  }

  // ---- routing, the stream and the banner --------------------------------------------------

  function route() {
    const parts = (location.hash.replace(/^#\/?/, "") || "").split("/").filter(Boolean).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    if (parts.length === 0) return { nav: "overview", render: null, params: {} };
    if (parts[0] === "nodes" && parts.length === 2) return { nav: "overview", render: nodePage, params: { name: parts[1] } };
    if (parts[0] === "migrations" && parts.length === 1) return { nav: "migrations", render: migrationsPage, params: {} };
    if (parts[0] === "rollouts" && parts.length === 1) return { nav: "rollouts", render: rolloutsPage, params: {} };
    if (parts[0] === "rollouts" && parts.length === 2) return { nav: "rollouts", render: rolloutPage, params: { id: parts[1] } };
    if (parts[0] === "policies" && parts.length === 1) return { nav: "policies", render: policiesPage, params: {} };
    return { nav: "", render: async () => [el("h1", {}, "Not found"), empty("There is no such page.", el("a", { href: "#/" }, "Go to the fleet"))], params: {} };
  }

  let generation = 0;
  let lastRender = 0;
  let streamUp = false;
  let controllerHealth = null; // the last snapshot's `health` (null: unknown)

  function setLive() {
    const live = document.getElementById("live");
    let cls = "err", text = "disconnected";
    if (streamUp && controllerHealth && !controllerHealth.ok) { cls = "warn"; text = "degraded"; }
    else if (streamUp) { cls = "ok"; text = `live · ${new Date((latest && latest.generated_at ? latest.generated_at : nowS()) * 1000).toLocaleTimeString([], { hour12: false })}`; }
    live.className = `live ${cls}`;
    live.textContent = text;
  }

  // The banner: the controller unreachable, or the controller up but its broker link or database
  // down (then node states are as last reported, not a site outage).
  function banner(kind, text) {
    const b = document.getElementById("banner");
    b.hidden = !text;
    b.dataset.kind = kind || "";
    b.textContent = text || "";
  }
  function showHealth(health) {
    controllerHealth = health || null;
    if (!health || health.ok) { banner("", ""); return; }
    const parts = [];
    if (health.broker === false) parts.push("The controller's link to the MQTT broker is down: no telemetry arrives, " +
      "so node states and charts below are as last reported (nodes may look offline; that is not a site outage).");
    if (health.database === false) parts.push("The controller's database is not writable or readable: figures may be stale.");
    if (!parts.length) parts.push("The controller is unhealthy.");
    banner(health.broker === false ? "broker" : health.database === false ? "database" : "controller",
      `${parts.join(" ")} (${(health.reasons || []).join("; ")})`);
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
      needToken = false;
      show();
      connect();
    });
    return form;
  }
  let needToken = false;
  function askToken() {
    needToken = true;
    destroyCharts();
    banner("", "");
    document.getElementById("main").replaceChildren(tokenForm(Boolean(storedToken())));
    document.getElementById("token").focus();
    document.body.dataset.ready = "token";
  }

  // Shows the current page: the overview from the last snapshot, another page read anew.
  async function show() {
    if (needToken) return;
    const mine = ++generation;
    const current = route();
    for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.route === current.nav);
    if (!current.render) { if (latest) renderOverview(latest); return; }
    lastRender = Date.now();
    try {
      const view = await current.render(current.params);
      if (mine !== generation) return;
      const y = window.scrollY;
      destroyCharts();
      document.getElementById("main").replaceChildren(...view.filter(Boolean));
      window.scrollTo(0, y);
      document.body.dataset.ready = current.nav || "none";
    } catch (err) {
      if (mine !== generation) return;
      if (err instanceof HttpError && err.status === 401) { askToken(); return; }
      banner("controller", `Cannot read ${err.message}.`);
    }
  }

  function onSnapshot(snap) {
    if (!snap.stale) latest = snap;
    showHealth(snap.health);
    setLive();
    const current = route();
    if (!current.render) { if (latest) renderOverview(latest); }
    else if (Date.now() - lastRender >= OTHER_REFRESH_MS && !document.hidden) show();
  }

  // The server push: GET /api/v1/dashboard/stream, read through fetch (EventSource cannot send a
  // bearer token). Each `snapshot` event is a JSON object; the stream ends after a while and is
  // opened again at once, or after RETRY_MS when it failed.
  async function connect() {
    const headers = { Accept: "text/event-stream" };
    const token = storedToken();
    if (token) headers.Authorization = `Bearer ${token}`;
    let failed = false;
    try {
      const response = await fetch("/api/v1/dashboard/stream", { headers, cache: "no-store" });
      if (response.status === 401) { streamUp = false; setLive(); askToken(); return; }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      streamUp = true;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (!data || !/^event: snapshot$/m.test(block)) continue;
          try { onSnapshot(JSON.parse(data)); } catch (err) { console.warn("bad snapshot", err); }
        }
      }
    } catch (err) {
      failed = true;
      streamUp = false;
      setLive();
      banner("unreachable", `Cannot reach the controller (${err.message}); retrying every ${RETRY_MS / 1000} s.`);
    }
    if (!needToken) setTimeout(connect, failed ? RETRY_MS : 0);
  }

  window.addEventListener("hashchange", () => {
    destroyCharts();
    document.getElementById("main").replaceChildren(el("p", { class: "empty" }, "Loading…"));
    window.scrollTo(0, 0);
    show();
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden && route().render) show(); });
  show();
  connect();
})();
