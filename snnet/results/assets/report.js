(function () {
"use strict";
const D = JSON.parse(document.getElementById("report-data").textContent);
const NS = "http://www.w3.org/2000/svg", STEPS = 1000;
const W = 720, H = 440, M = {l: 62, r: 18, t: 14, b: 46};
const $ = (id) => document.getElementById(id);
const state = {cost: D.initial, pos: STEPS, focus: 0, sel: null, picks: []};
const recs = D.files.map((f) => new Map(f.records.map((r) => [r.cfg_id, r])));

function svg(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function node(tag, parent, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  if (parent) parent.appendChild(e);
  return e;
}
function short(v) {  // 2763712 -> 2.764M (the K/M/G budgets of snnet select)
  const units = [[1e12, "T"], [1e9, "G"], [1e6, "M"], [1e3, "K"]];
  for (const [s, u] of units) if (Math.abs(v) >= s) return +(v / s).toPrecision(4) + u;
  return String(+v.toPrecision(4));
}
function fmtCost(c, v) {
  return c.key.startsWith("latency") ? v.toFixed(3) + " ms" : short(v) + " " + c.name;
}
function ticks(lo, hi, n) {
  const raw = (hi - lo) / n, p = Math.pow(10, Math.floor(Math.log10(raw))), e = raw / p;
  const step = p * (e >= 7.5 ? 10 : e >= 3.5 ? 5 : e >= 1.5 ? 2 : 1), out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}
function budgetAt(pos) {  // the slider is logarithmic between the cheapest and the most expensive stitch
  const c = D.costs[state.cost];
  if (pos <= 0) return c.min;
  if (pos >= STEPS) return c.max;
  const b = c.min > 0 ? Math.exp(Math.log(c.min) + (Math.log(c.max) - Math.log(c.min)) * pos / STEPS)
                      : c.min + (c.max - c.min) * pos / STEPS;
  return Math.min(c.max, Math.max(c.min, c.integer ? Math.floor(b) : +b.toPrecision(6)));
}
function pickAt(steps, budget) {  // the largest step at or below the budget: snnet select's choice there
  let lo = 0, hi = steps.at.length - 1, k = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (steps.at[mid] <= budget) { k = mid; lo = mid + 1; } else hi = mid - 1;
  }
  return k < 0 ? null : {cfg: steps.pick[k], fit: steps.fit[k]};
}

// ---------------------------------------------------------------------------------------------- scatter
let X, Y;
function star(x, y, r) {
  let d = "";
  for (let i = 0; i < 10; i++) {
    const a = Math.PI / 2 + i * Math.PI / 5, rr = i % 2 ? r * 0.45 : r;
    d += (i ? "L" : "M") + (x + rr * Math.cos(a)).toFixed(1) + "," + (y - rr * Math.sin(a)).toFixed(1);
  }
  return d + "Z";
}
function drawPlot() {
  const c = D.costs[state.cost], plot = $("plot");
  plot.textContent = "";
  const all = [];
  D.files.forEach((f) => f.records.forEach((r) => all.push(r)));
  let x0 = c.min / c.scale, x1 = c.max / c.scale;
  let y0 = Math.min(...all.map((r) => r.acc1)), y1 = Math.max(...all.map((r) => r.acc1));
  const px = (x1 - x0) * 0.06 || Math.abs(x0) * 0.1 || 1, py = (y1 - y0) * 0.08 || 1;
  x0 -= px; x1 += px; y0 = Math.max(0, y0 - py); y1 = Math.min(100, y1 + py);
  X = (v) => M.l + (v / c.scale - x0) / (x1 - x0) * (W - M.l - M.r);
  Y = (v) => H - M.b - (v - y0) / (y1 - y0) * (H - M.t - M.b);
  svg("rect", {id: "over-zone", class: "over-zone", x: W - M.r, y: M.t, width: 0, height: H - M.t - M.b}, plot);
  const grid = svg("g", {class: "grid"}, plot), axis = svg("g", {class: "axis"}, plot);
  for (const t of ticks(x0, x1, 7)) {
    const x = X(t * c.scale);
    svg("line", {x1: x, x2: x, y1: M.t, y2: H - M.b}, grid);
    svg("text", {x: x, y: H - M.b + 16, "text-anchor": "middle"}, axis).textContent = String(t);
  }
  for (const t of ticks(y0, y1, 6)) {
    const y = Y(t);
    svg("line", {x1: M.l, x2: W - M.r, y1: y, y2: y}, grid);
    svg("text", {x: M.l - 6, y: y + 4, "text-anchor": "end"}, axis).textContent = String(t);
  }
  svg("path", {d: `M${M.l},${M.t}V${H - M.b}H${W - M.r}`, fill: "none"}, axis);
  svg("text", {x: (M.l + W - M.r) / 2, y: H - 8, "text-anchor": "middle"}, axis).textContent = c.unit;
  svg("text", {x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
               transform: `rotate(-90 14 ${(M.t + H - M.b) / 2})`}, axis).textContent = "top-1 (%)";
  svg("line", {id: "budget-line", class: "budget-line", x1: 0, x2: 0, y1: M.t, y2: H - M.b}, plot);
  D.files.forEach((f, i) => {
    const front = c.fronts[i].map((id) => recs[i].get(id));
    svg("polyline", {class: "front", stroke: f.colour, "data-file": i,
                     points: front.map((r) => X(r[c.key]) + "," + Y(r.acc1)).join(" ")}, plot);
    for (const r of front) if (!r.anchor) {
      svg("text", {class: "flabel", x: X(r[c.key]) - 4, y: Y(r.acc1) - 6, "text-anchor": "end"}, plot)
        .textContent = String(r.cfg_id);
    }
  });
  if (c.combined) {
    svg("polyline", {class: "combined", points: c.combined.map(([i, id]) => {
      const r = recs[i].get(id); return X(r[c.key]) + "," + Y(r.acc1); }).join(" ")}, plot);
  }
  D.files.forEach((f, i) => f.records.forEach((r) => {
    const x = X(r[c.key]), y = Y(r.acc1);
    const p = r.anchor ? svg("path", {d: star(x, y, 9), stroke: "#000", "stroke-width": 0.8}, plot)
                       : svg("circle", {cx: x, cy: y, r: 4.2, "fill-opacity": 0.8}, plot);
    p.setAttribute("fill", f.colour);
    p.setAttribute("class", "pt");
    p.dataset.file = i;
    p.dataset.cfgId = r.cfg_id;
    p.addEventListener("mouseenter", (ev) => showTip(i, r, ev));
    p.addEventListener("mousemove", moveTip);
    p.addEventListener("mouseleave", hideTip);
    p.addEventListener("click", () => { state.focus = i; choose(i, r.cfg_id, "clicked"); });
  }));
  svg("g", {id: "rings"}, plot);
}

// ---------------------------------------------------------------------------------------------- details
function facts(i, r) {  // [label, value] of everything a record says, costs first
  const out = [["file", D.files[i].label + " (" + D.files[i].path + ")"], ["route", r.route]];
  if (r.flops != null) out.push(["FLOPs", short(r.flops) + " (" + r.flops.toLocaleString("en-US") + ")"]);
  if (r.params != null) out.push(["params", short(r.params) + " (" + r.params.toLocaleString("en-US") + ")"]);
  out.push(["top-1", r.acc1.toFixed(2) + "%" + (r.acc5 != null ? "   top-5 " + r.acc5.toFixed(2) + "%" : "")]);
  for (const k of Object.keys(r).filter((k) => /^latency_ms_b\d+$/.test(k)).sort()) {
    out.push(["latency", r[k].toFixed(3) + " ms at batch " + k.slice(12) +
              (r.latency_device ? " (" + r.latency_device + ")" : "")]);
  }
  if (r.samples != null) out.push(["evaluated on", r.samples.toLocaleString("en-US") + " images" +
                                   (Array.isArray(r.img_size) ? " of " + r.img_size.join("x") : "")]);
  const c = D.costs[state.cost];
  out.push(["Pareto front", c.fronts[i].indexOf(r.cfg_id) >= 0 ? "yes (" + c.name + ")" : "no (" + c.name + ")"]);
  return out;
}
function showTip(i, r, ev) {
  const tip = $("tip");
  tip.textContent = "";
  node("b", tip, "cfg_id " + r.cfg_id + (r.anchor ? " (anchor)" : ""));
  for (const [k, v] of facts(i, r)) node("div", tip, k + ": " + v);
  tip.hidden = false;
  tip.dataset.cfgId = r.cfg_id;
  tip.dataset.file = i;
  moveTip(ev);
}
function moveTip(ev) {
  const tip = $("tip"), w = tip.offsetWidth, h = tip.offsetHeight;
  tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - w - 4) + "px";
  tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - h - 4) + "px";
}
function hideTip() { $("tip").hidden = true; }

function choose(i, cfg, how) {
  state.sel = {file: i, cfg: cfg};
  const r = recs[i].get(cfg), det = $("details"), list = $("details-list");
  det.dataset.file = i;
  det.dataset.cfgId = cfg;
  det.dataset.how = how;
  $("details-title").textContent = "cfg_id " + cfg + " of " + D.files[i].label + " (" + how + ")";
  list.textContent = "";
  for (const [k, v] of facts(i, r)) { node("dt", list, k); node("dd", list, v); }
  drawRoute(i, r);
  rings();
  document.querySelectorAll("#picks tbody tr").forEach((tr) =>
    tr.classList.toggle("focus", +tr.dataset.file === state.focus));
}

function drawRoute(i, r) {
  const g = $("route"), f = D.files[i], legend = $("route-legend");
  g.textContent = "";
  legend.textContent = "";
  g.dataset.cfgId = r.cfg_id;
  g.dataset.route = r.route;
  const boxes = r.boxes;
  if (!boxes) {
    svg("text", {x: 10, y: 50}, g).textContent = "cfg_id " + r.cfg_id + ": this file records no route " +
      "(SN-Net's format); train.py --eval writes them";
    return;
  }
  const AW = 210, LW = 64, GAP = 26, BH = 58, top = 18;
  const width = boxes.reduce((s, b) => s + (b.kind === "anchor" ? AW : LW), 0) + GAP * (boxes.length - 1) + 20;
  g.setAttribute("viewBox", `0 0 ${Math.max(width, 1100)} 96`);  // one scale for short and long routes
  const defs = svg("defs", {}, g), mk = svg("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto"}, defs);
  svg("path", {d: "M0,0L10,5L0,10Z", fill: "#555"}, mk);
  let x = 10;
  boxes.forEach((b, k) => {
    if (k) svg("line", {x1: x - GAP + 2, x2: x - 2, y1: top + BH / 2, y2: top + BH / 2, stroke: "#555",
                        "stroke-width": 1.5, "marker-end": "url(#arrow)"}, g);
    const w = b.kind === "anchor" ? AW : LW;
    const box = svg("g", {class: b.kind === "anchor" ? "seg" : "layer"}, g);
    if (b.kind === "anchor") {
      box.dataset.anchor = b.anchor;
      box.dataset.name = b.name;
      const colour = D.anchor_colours[b.anchor % D.anchor_colours.length];
      svg("rect", {x: x, y: top, width: w, height: BH, rx: 6, fill: colour, "fill-opacity": 0.85,
                   stroke: "#333"}, box);
      svg("text", {x: x + w / 2, y: top + 23, "text-anchor": "middle", "font-size": 12, "font-weight": 600},
          box).textContent = b.name.length > 30 ? b.name.slice(0, 29) + "\u2026" : b.name;
      const span = b.first || b.last ? (b.first || "input") + " \u2192 " + (b.last || "head") : "whole network";
      svg("text", {x: x + w / 2, y: top + 42, "text-anchor": "middle", "font-size": 11}, box).textContent =
        "anchor " + b.anchor + ": " + span;
    } else {
      box.dataset.address = b.address;
      svg("rect", {x: x, y: top + 8, width: w, height: BH - 16, rx: 4, fill: "#e8e8e8", stroke: "#555"}, box);
      svg("text", {x: x + w / 2, y: top + 26, "text-anchor": "middle", "font-size": 10}, box).textContent = "stitch";
      svg("text", {x: x + w / 2, y: top + 40, "text-anchor": "middle", "font-size": 11, "font-weight": 600},
          box).textContent = b.address;
    }
    x += w + GAP;
  });
  svg("text", {x: 10, y: 12, "font-size": 11, fill: "#555"}, g).textContent =
    "route of cfg_id " + r.cfg_id + ": " + r.route;
  f.anchor_names.forEach((name, a) => {
    const sw = node("span", legend, "", "sw");
    sw.style.background = D.anchor_colours[a % D.anchor_colours.length];
    node("span", legend, "anchor " + a + ": " + name);
  });
}

// ---------------------------------------------------------------------------------------------- budget
function rings() {
  const g = $("rings"), c = D.costs[state.cost];
  if (!g) return;
  g.textContent = "";
  state.picks.forEach((p, i) => {
    if (!p) return;
    const r = recs[i].get(p.cfg);
    svg("circle", {class: "pick-ring", cx: X(r[c.key]), cy: Y(r.acc1), r: 9, "data-file": i,
                   "data-cfg-id": p.cfg}, g);
  });
  if (state.sel) {
    const r = recs[state.sel.file].get(state.sel.cfg);
    svg("circle", {class: "sel-ring", cx: X(r[c.key]), cy: Y(r.acc1), r: 13}, g);
  }
}
function update() {
  const c = D.costs[state.cost], b = budgetAt(state.pos), out = $("budget-value");
  out.dataset.budget = String(b);
  out.dataset.cost = c.key;
  out.textContent = "\u2264 " + fmtCost(c, b);
  const bx = X(b);
  const line = $("budget-line");
  line.setAttribute("x1", bx);
  line.setAttribute("x2", bx);
  const zone = $("over-zone");
  zone.setAttribute("x", bx);
  zone.setAttribute("width", Math.max(0, W - M.r - bx));
  document.querySelectorAll("#plot .pt").forEach((p) =>
    p.classList.toggle("over", recs[+p.dataset.file].get(+p.dataset.cfgId)[c.key] > b));
  state.picks = D.files.map((f, i) => pickAt(c.steps[i], b));
  const body = document.querySelector("#picks tbody");
  body.textContent = "";
  D.files.forEach((f, i) => {
    const p = state.picks[i], tr = node("tr", body);
    tr.dataset.file = i;
    tr.dataset.cfgId = p ? p.cfg : "";
    const sw = node("span", node("td", tr), "", "");
    sw.style.cssText = `display:inline-block;width:12px;height:12px;border-radius:2px;background:${f.colour}`;
    node("td", tr, f.label);
    if (!p) {
      const td = node("td", tr, "none fits: the cheapest costs " + fmtCost(c, c.steps[i].at[0]));
      td.colSpan = 4;
    } else {
      const r = recs[i].get(p.cfg);
      node("td", tr, String(p.cfg));
      node("td", tr, r.acc1.toFixed(2));
      node("td", tr, fmtCost(c, r[c.key]));
      node("td", tr, p.fit + " of " + f.records.length);
    }
    tr.addEventListener("click", () => { if (p) { state.focus = i; choose(i, p.cfg, "best within the budget"); } });
  });
  const p = state.picks[state.focus];
  $("command").textContent = "= snnet select " + D.files[state.focus].path + " " + c.flag + " " + String(b);
  if (p) choose(state.focus, p.cfg, "best within the budget");
  else rings();
}

function init() {
  const sel = $("cost");
  D.costs.forEach((c, k) => { const o = node("option", sel, c.name); o.value = k; });
  sel.value = String(state.cost);
  sel.addEventListener("change", () => { state.cost = +sel.value; drawPlot(); update(); });
  const slider = $("budget");
  slider.max = STEPS;
  slider.value = state.pos;
  slider.addEventListener("input", () => { state.pos = +slider.value; update(); });
  const legend = $("legend");
  D.files.forEach((f) => {
    const item = node("span", legend);
    node("span", item, "", "sw").style.background = f.colour;
    node("span", item, f.label + " (" + f.records.length + " stitches, " + f.anchors + " anchors)");
  });
  node("span", legend, "\u2605 anchor   \u25cf stitch   \u2014 Pareto front" +
                       (D.files.length > 1 ? "   - - combined front" : "") + "   \u25ef best within the budget");
  drawPlot();
  update();
  document.body.dataset.ready = "1";
}
init();
})();
