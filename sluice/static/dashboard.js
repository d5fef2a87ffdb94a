// Sluice dashboard: polls /api/state every second and draws the plots on <canvas>.
// Hand-written on purpose: no third-party code to vendor, audit or fetch (the page works on a
// machine with no network at all), and the plots needed are plain time series.
"use strict";

const VIEW_S = 300; // seconds of history on the x axis
const PALETTE = [
  "#58a6ff", "#f0883e", "#3fb950", "#d2a8ff", "#ff7b72", "#e3b341",
  "#39c5cf", "#f778ba", "#a5d6ff", "#7ee787", "#ffa657", "#bc8cff",
];
const BREAKER = ["closed", "half-open", "open"];

const hist = { t: [], series: {} };
let last = 0;
let windowS = 600;
let state = null;
// One colour per stage everywhere (lag of its group, its throughput, its breaker); partitions
// take theirs by partition number.
const colors = new Map([
  ["preprocess", "#3fb950"], ["compute", "#58a6ff"], ["postprocess", "#f0883e"],
  ["archiver", "#d2a8ff"], ["gateway", "#e3b341"],
]);
const partitionPanels = new Map();

function colorFor(name) {
  const partition = /\[(\d+)\]$/.exec(name);
  if (partition) return PALETTE[Number(partition[1]) % PALETTE.length];
  if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
  return colors.get(name);
}

function fmt(v, digits = 0) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const abs = Math.abs(v);
  if (abs >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (abs >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (abs >= 1e4) return (v / 1e3).toFixed(1) + "k";
  return v.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function bytes(v) {
  if (v === null || v === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return v.toFixed(i ? 1 : 0) + " " + units[i];
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

// ---- history ---------------------------------------------------------------------------------

function merge(h) {
  const n = h.t.length;
  if (!n) return;
  const old = hist.t.length;
  for (const k of Object.keys(h.series)) {
    if (!(k in hist.series)) hist.series[k] = new Array(old).fill(null);
  }
  for (const k of Object.keys(hist.series)) {
    const add = h.series[k] || new Array(n).fill(null);
    for (const v of add) hist.series[k].push(v);
  }
  for (const t of h.t) hist.t.push(t);
  last = hist.t[hist.t.length - 1];
  const cutoff = last - windowS;
  let drop = 0;
  while (drop < hist.t.length && hist.t[drop] < cutoff) drop++;
  if (drop) {
    hist.t.splice(0, drop);
    for (const k of Object.keys(hist.series)) hist.series[k].splice(0, drop);
  }
}

function seriesOf(prefix, label) {
  return Object.keys(hist.series)
    .filter((k) => k.startsWith(prefix))
    .sort()
    .map((k) => ({ key: k, label: label(k.slice(prefix.length)), values: hist.series[k] }));
}

// ---- names -----------------------------------------------------------------------------------

function shortGroup(g) {
  const p = state && state.group_prefix;
  return p && g.startsWith(p) && g.length > p.length ? g.slice(p.length) : g;
}

function shortTopic(t) {
  const p = state && state.topic_prefix;
  return p && t.startsWith(p) ? t.slice(p.length) : t;
}

// ---- the chart -------------------------------------------------------------------------------

function niceStep(range, ticks) {
  const raw = range / ticks;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const n = raw / mag;
  return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8);
}

function drawChart(canvas, legend, series, opts = {}) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth;
  const H = canvas.clientHeight;
  if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
    canvas.width = Math.round(W * dpr);
    canvas.height = Math.round(H * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  const L = 58, R = 14, T = 8, B = 22;
  const pw = W - L - R, ph = H - T - B;
  const ts = hist.t;
  const t1 = ts.length ? ts[ts.length - 1] : Date.now() / 1000;
  let t0 = Math.max(ts.length ? ts[0] : t1, t1 - VIEW_S);
  if (t1 - t0 < 10) t0 = t1 - 10;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * pw;

  let ymax = 0;
  for (const s of series) {
    for (let i = 0; i < ts.length; i++) {
      const v = s.values[i];
      if (v !== null && ts[i] >= t0 && v > ymax) ymax = v;
    }
  }
  let step;
  if (opts.yMax !== undefined) {
    ymax = opts.yMax;
    step = opts.yStep || niceStep(ymax, 4);
  } else {
    ymax = ymax <= 0 ? 1 : ymax * 1.08;
    step = niceStep(ymax, 4);
    ymax = Math.ceil(ymax / step) * step;
  }
  const y = (v) => T + ph - (v / ymax) * ph;

  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  ctx.strokeStyle = "#28313b";
  ctx.fillStyle = "#7d8a99";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let v = 0; v <= ymax + step / 1000; v += step) {
    const py = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(L, py); ctx.lineTo(L + pw, py); ctx.stroke();
    const text = opts.yLabels ? (opts.yLabels[Math.round(v)] || "") : fmt(v, step < 1 ? 1 : 0);
    ctx.fillText(text, L - 6, py);
  }
  const span = t1 - t0;
  const xstep = [5, 10, 15, 30, 60, 120, 300, 600].find((s) => span / s <= 6) || 600;
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let t = Math.ceil(t0 / xstep) * xstep; t <= t1; t += xstep) {
    const px = Math.round(x(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(px, T); ctx.lineTo(px, T + ph); ctx.stroke();
    ctx.fillText(clock(t), px, T + ph + 5);
  }

  ctx.lineWidth = 1.8;
  ctx.lineJoin = "round";
  for (const s of series) {
    ctx.strokeStyle = colorFor(s.label);
    ctx.beginPath();
    let pen = false, prevY = 0;
    for (let i = 0; i < ts.length; i++) {
      const v = s.values[i];
      if (v === null || v === undefined || ts[i] < t0) { pen = false; continue; }
      const px = x(ts[i]), py = y(v);
      if (!pen) ctx.moveTo(px, py);
      else if (opts.step) { ctx.lineTo(px, prevY); ctx.lineTo(px, py); }
      else ctx.lineTo(px, py);
      pen = true;
      prevY = py;
    }
    ctx.stroke();
  }
  if (!series.length) {
    ctx.fillStyle = "#7d8a99";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(opts.empty || "no data yet", L + pw / 2, T + ph / 2);
  }

  legend.replaceChildren(
    ...series.map((s) => {
      let lastV = null;
      for (let i = s.values.length - 1; i >= 0; i--) if (s.values[i] !== null) { lastV = s.values[i]; break; }
      const shown = opts.yLabels ? (opts.yLabels[lastV] || "–") : fmt(lastV, opts.digits || 0);
      return el("span", {}, el("span", { class: "sw", style: `background:${colorFor(s.label)}` }),
        s.label, el("b", {}, shown));
    }),
  );
}

// ---- the page --------------------------------------------------------------------------------

function renderCards() {
  const box = document.getElementById("cards");
  const cards = state.groups.map((g) => {
    const r = g.rate;
    let trend = el("span", {}, "steady");
    if (r !== null && r > 0.5) trend = el("span", { class: "up" }, `↑ ${fmt(r, 1)}/s`);
    else if (r !== null && r < -0.5) trend = el("span", { class: "down" }, `↓ ${fmt(-r, 1)}/s`);
    return el("div", { class: "card", "data-group": g.group },
      el("div", { class: "name", title: g.group }, g.group),
      el("div", { class: "big", "data-testid": `lag-${g.group}` }, String(g.lag)),
      el("div", { class: "sub" }, trend, ` · ${g.members} member${g.members === 1 ? "" : "s"} · ${g.state}`));
  });
  if (!cards.length) cards.push(el("div", { class: "card" }, el("div", { class: "sub" }, "no consumer groups yet")));
  box.replaceChildren(...cards);
}

function partitionPanel(group) {
  if (!partitionPanels.has(group)) {
    const canvas = el("canvas");
    const legend = el("div", { class: "legend" });
    const fig = el("figure", { class: "panel", "data-partitions": group },
      el("figcaption", {}, `Lag per partition · ${shortGroup(group)} `, el("span", { class: "dim" }, group)),
      canvas, legend);
    document.getElementById("partition-panels").append(fig);
    partitionPanels.set(group, { canvas, legend });
  }
  return partitionPanels.get(group);
}

function renderCharts() {
  const $ = (id) => document.getElementById(id);
  drawChart($("chart-lag"), $("legend-lag"), seriesOf("lag/", shortGroup));
  const lanes = seriesOf("lane/", (rest) => {
    const cut = rest.lastIndexOf("/");
    return `${shortGroup(rest.slice(0, cut))} ${rest.slice(cut + 1)}`;
  });
  $("panel-lanes").hidden = !lanes.length;
  if (lanes.length) drawChart($("chart-lanes"), $("legend-lanes"), lanes);
  for (const g of state.groups) {
    const p = partitionPanel(g.group);
    const series = seriesOf(`plag/${g.group}/`, (rest) => {
      const cut = rest.lastIndexOf("/");
      return `${shortTopic(rest.slice(0, cut))}[${rest.slice(cut + 1)}]`;
    });
    drawChart(p.canvas, p.legend, series);
  }
  const empty = "no stage endpoints scraped";
  drawChart($("chart-throughput"), $("legend-throughput"), seriesOf("throughput/", (s) => s), { digits: 1, empty });
  drawChart($("chart-dlq"), $("legend-dlq"), seriesOf("dlq/", (s) => s), { digits: 2, empty });
  drawChart($("chart-workers"), $("legend-workers"), seriesOf("members/", shortGroup));
  drawChart($("chart-breaker"), $("legend-breaker"), seriesOf("breaker/", (s) => s),
    { yMax: 2, yStep: 1, yLabels: BREAKER, step: true, empty });
  const tokens = seriesOf("tokens/", (s) => s);
  $("panel-tokens").hidden = !tokens.length;
  if (tokens.length) drawChart($("chart-tokens"), $("legend-tokens"), tokens, { digits: 1 });
}

function renderTables() {
  const rows = [];
  for (const g of state.groups) {
    for (const p of g.partitions) {
      rows.push(el("tr", {}, el("td", {}, g.group), el("td", {}, p.topic), el("td", {}, p.partition),
        el("td", {}, p.committed === null ? "–" : p.committed), el("td", {}, p.end),
        el("td", {}, p.lag === null ? "–" : p.lag),
        el("td", {}, p.rate === null ? "–" : fmt(p.rate, 1))));
    }
  }
  document.querySelector("#partitions tbody").replaceChildren(...rows);

  const stages = state.stages.map((s) => {
    const b = s.breaker_state || "unknown";
    const mem = s.memory === null ? "–" : `${bytes(s.memory)} / ${bytes(s.memory_limit)}`;
    return el("tr", {}, el("td", {}, s.stage), el("td", {}, `${s.up}/${s.targets}`),
      el("td", {}, fmt(s.throughput, 1)), el("td", {}, fmt(s.in_flight)), el("td", {}, fmt(s.dlq_total)),
      el("td", {}, el("span", { class: `badge ${b}` }, b)), el("td", {}, mem));
  });
  document.querySelector("#stages tbody").replaceChildren(...stages);
  // Counts of stages per state, from the same rows as the table (not the chart's axis labels).
  document.getElementById("breaker-summary").textContent =
    BREAKER.map((name) => `${state.breakers[name]} ${name}`).join(" · ");
  document.getElementById("no-scrape").hidden = state.targets.length > 0;

  const dlt = Object.entries(state.dlt).map(([topic, n]) => el("tr", {}, el("td", {}, topic), el("td", {}, fmt(n))));
  document.querySelector("#dlt tbody").replaceChildren(...dlt);
}

function render() {
  document.getElementById("bootstrap").textContent = state.bootstrap;
  document.getElementById("updated").textContent = clock(state.now);
  renderCards();
  renderCharts();
  renderTables();
}

function setStatus(ok, text) {
  const s = document.getElementById("status");
  s.className = "status " + (ok ? "ok" : "bad");
  s.textContent = text;
}

async function poll() {
  try {
    const response = await fetch(`/api/state?since=${last}`, { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    state = await response.json();
    windowS = state.window_s || windowS;
    merge(state.history);
    render();
    setStatus(true, "live");
  } catch (e) {
    setStatus(false, `disconnected (${e.message})`);
  } finally {
    setTimeout(poll, (state && state.interval_s ? state.interval_s : 1) * 1000);
  }
}

window.addEventListener("resize", () => { if (state) renderCharts(); });
poll();
