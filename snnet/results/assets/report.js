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
// The view: x (cost, in axis units) and y (top-1) ranges; null = every stitch. Zoom (wheel) and pan (drag) change it.
let X, Y;
const view = {x: null, y: null};
function logScale() { return $("xscale").value === "log"; }
function fullView() {
  const c = D.costs[state.cost], all = [];
  D.files.forEach((f) => f.records.forEach((r) => all.push(r)));
  let x0 = c.min / c.scale, x1 = c.max / c.scale;
  let y0 = Math.min(...all.map((r) => r.acc1)), y1 = Math.max(...all.map((r) => r.acc1));
  if (logScale()) {
    const f = Math.pow(x1 / x0, 0.06) || 1.5;
    x0 /= f; x1 *= f;
    if (x1 / x0 < 1.2) { x0 /= 1.1; x1 *= 1.1; }
  } else {
    const px = (x1 - x0) * 0.06 || Math.abs(x0) * 0.1 || 1;
    x0 -= px; x1 += px;
  }
  const py = (y1 - y0) * 0.08 || 1;
  return {x: [x0, x1], y: [Math.max(0, y0 - py), Math.min(100, y1 + py)]};
}
function tx(v) { return logScale() ? Math.log(v) : v; }  // axis units -> screen-linear units
function logTicks(lo, hi) {  // 1, 2, 5 per decade, fewer when the range is wide
  const out = [], decades = Math.log10(hi / lo), mult = decades > 4 ? [1] : decades > 2 ? [1, 3] : [1, 2, 5];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
    for (const m of mult) { const v = m * Math.pow(10, e); if (v >= lo && v <= hi) out.push(+v.toPrecision(6)); }
  }
  return out.length >= 2 ? out : ticks(lo, hi, 5).filter((v) => v > 0);
}
function star(x, y, r) {
  let d = "";
  for (let i = 0; i < 10; i++) {
    const a = Math.PI / 2 + i * Math.PI / 5, rr = i % 2 ? r * 0.45 : r;
    d += (i ? "L" : "M") + (x + rr * Math.cos(a)).toFixed(1) + "," + (y - rr * Math.sin(a)).toFixed(1);
  }
  return d + "Z";
}
function overlaps(a, b) {
  return a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height;
}
function placeLabels(plot, wanted) {
  // wanted: [{x, y, text, cls}], most important first; each tries four places around its point and is dropped when
  // none is free of the labels already placed and inside the plot area: only as many labels as fit
  const placed = [], g = svg("g", {id: "labels"}, plot);
  const inside = (b) => b.x >= M.l && b.x + b.width <= W - M.r && b.y >= M.t && b.y + b.height <= H - M.b;
  for (const w of wanted) {
    const t = svg("text", {class: w.cls}, g);
    t.textContent = w.text;
    let ok = false;
    for (const [dx, dy, anchor] of [[-6, -7, "end"], [7, -7, "start"], [7, 13, "start"], [-6, 13, "end"]]) {
      t.setAttribute("x", w.x + dx); t.setAttribute("y", w.y + dy); t.setAttribute("text-anchor", anchor);
      const b = t.getBBox();
      if (inside(b) && !placed.some((p) => overlaps(p, b))) { placed.push(b); ok = true; break; }
    }
    if (!ok) t.remove();
  }
}
function drawPlot() {
  const c = D.costs[state.cost], plot = $("plot");
  plot.textContent = "";
  if (!view.x) Object.assign(view, fullView());
  const [x0, x1] = view.x, [y0, y1] = view.y, l0 = tx(x0), l1 = tx(x1);
  X = (v) => M.l + (tx(v / c.scale) - l0) / (l1 - l0) * (W - M.l - M.r);
  Y = (v) => H - M.b - (v - y0) / (y1 - y0) * (H - M.t - M.b);
  plot.dataset.x0 = x0; plot.dataset.x1 = x1; plot.dataset.scale = $("xscale").value;
  const clip = svg("clipPath", {id: "area"}, svg("defs", {}, plot));
  svg("rect", {x: M.l, y: M.t, width: W - M.l - M.r, height: H - M.t - M.b}, clip);
  const body = svg("g", {"clip-path": "url(#area)"}, plot);
  svg("rect", {id: "over-zone", class: "over-zone", x: W - M.r, y: M.t, width: 0, height: H - M.t - M.b}, body);
  const grid = svg("g", {class: "grid"}, body), axis = svg("g", {class: "axis"}, plot);
  for (const t of logScale() ? logTicks(x0, x1) : ticks(x0, x1, 7)) {
    const x = X(t * c.scale);
    svg("line", {x1: x, x2: x, y1: M.t, y2: H - M.b}, grid);
    svg("text", {class: "xtick", x: x, y: H - M.b + 16, "text-anchor": "middle"}, axis).textContent = short(t);
  }
  for (const t of ticks(y0, y1, 6)) {
    const y = Y(t);
    svg("line", {x1: M.l, x2: W - M.r, y1: y, y2: y}, grid);
    svg("text", {x: M.l - 6, y: y + 4, "text-anchor": "end"}, axis).textContent = String(t);
  }
  svg("path", {d: `M${M.l},${M.t}V${H - M.b}H${W - M.r}`, fill: "none"}, axis);
  svg("text", {x: (M.l + W - M.r) / 2, y: H - 8, "text-anchor": "middle"}, axis).textContent =
    c.unit + (logScale() ? ", log scale" : "");
  svg("text", {x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
               transform: `rotate(-90 14 ${(M.t + H - M.b) / 2})`}, axis).textContent = "top-1 (%)";
  svg("line", {id: "budget-line", class: "budget-line", x1: 0, x2: 0, y1: M.t, y2: H - M.b}, body);
  D.files.forEach((f, i) => {
    const front = c.fronts[i].map((id) => recs[i].get(id));
    svg("polyline", {class: "front", stroke: f.colour, "data-file": i,
                     points: front.map((r) => X(r[c.key]) + "," + Y(r.acc1)).join(" ")}, body);
  });
  D.files.forEach((f, i) => {  // the no-training baselines (snnet report --baselines), dashed, FLOPs axis only
    if (!f.baselines || c.key !== "flops") return;
    const b = f.baselines, cas = b.cascade;
    svg("polyline", {class: "baseline mixing", stroke: D.files.length > 1 ? f.colour : "#595959", fill: "none",
                     "stroke-dasharray": "6 4", "stroke-width": 1.2, "data-file": i,
                     points: b.mixing.map((p) => X(p.flops) + "," + Y(p.acc1)).join(" ")}, body);
    const steps = [];
    cas.forEach((p, k) => {
      steps.push(X(p.flops) + "," + Y(p.acc1));
      steps.push(X(k + 1 < cas.length ? cas[k + 1].flops : Math.max(b.ref_cost, p.flops)) + "," + Y(p.acc1));
    });
    svg("polyline", {class: "baseline cascade", stroke: D.files.length > 1 ? f.colour : "#9467bd", fill: "none",
                     "stroke-dasharray": "2 3", "stroke-width": 1.2, "data-file": i, points: steps.join(" ")}, body);
  });
  if (c.combined) {
    svg("polyline", {class: "combined", points: c.combined.map(([i, id]) => {
      const r = recs[i].get(id); return X(r[c.key]) + "," + Y(r.acc1); }).join(" ")}, body);
  }
  const point = (i, r) => {  // stitches first, anchors after: the stars are drawn above the dots
    const x = X(r[c.key]), y = Y(r.acc1), f = D.files[i];
    const p = r.anchor ? svg("path", {d: star(x, y, 9), stroke: "#000", "stroke-width": 0.8}, body)
                       : svg("circle", {cx: x, cy: y, r: 4.2, "fill-opacity": 0.8}, body);
    p.setAttribute("fill", f.colour);
    p.setAttribute("class", "pt");
    p.dataset.file = i;
    p.dataset.cfgId = r.cfg_id;
    p.addEventListener("mouseenter", (ev) => showTip(i, r, ev));
    p.addEventListener("mousemove", moveTip);
    p.addEventListener("mouseleave", hideTip);
    p.addEventListener("click", () => {
      if (drag.moved) return;
      state.focus = i;
      budgetCommand();
      choose(i, r.cfg_id, "clicked");
    });
  };
  D.files.forEach((f, i) => f.records.forEach((r) => { if (!r.anchor) point(i, r); }));
  D.files.forEach((f, i) => f.records.forEach((r) => { if (r.anchor) point(i, r); }));
  svg("g", {id: "rings"}, body);
  const wanted = [];  // anchors' names first, then the front's cfg_ids from the most accurate down
  D.files.forEach((f, i) => f.records.forEach((r) => {
    if (r.anchor) {
      wanted.push({x: X(r[c.key]), y: Y(r.acc1), text: r.name || r.route, cls: "alabel", acc: r.acc1 + 1e3});
    }
  }));
  D.files.forEach((f, i) => c.fronts[i].forEach((id) => {
    const r = recs[i].get(id);
    if (!r.anchor) wanted.push({x: X(r[c.key]), y: Y(r.acc1), text: String(r.cfg_id), cls: "flabel", acc: r.acc1});
  }));
  wanted.sort((a, b) => b.acc - a.acc);
  placeLabels(plot, wanted.filter((w) => w.x >= M.l && w.x <= W - M.r && w.y >= M.t && w.y <= H - M.b));
}
function toData(ev) {  // a mouse position as a fraction of the plot area (0..1 along x, 0..1 along y, y up)
  const b = $("plot").getBoundingClientRect(), sx = W / b.width, sy = H / b.height;
  return [((ev.clientX - b.left) * sx - M.l) / (W - M.l - M.r),
          (H - M.b - (ev.clientY - b.top) * sy) / (H - M.t - M.b)];
}
function rangeAt(lo, hi, log, f, k) {  // zoom a range by factor k around fraction f (in log space on a log axis)
  const a = log ? Math.log(lo) : lo, b = log ? Math.log(hi) : hi, m = a + (b - a) * f;
  const na = m - (m - a) * k, nb = m + (b - m) * k;
  return log ? [Math.exp(na), Math.exp(nb)] : [na, nb];
}
function zoom(k, fx, fy) {
  view.x = rangeAt(view.x[0], view.x[1], logScale(), fx, k);
  view.y = rangeAt(view.y[0], view.y[1], false, fy, k);
  redraw();
}
function pan(dfx, dfy) {
  const log = logScale(), a = tx(view.x[0]), b = tx(view.x[1]), d = (b - a) * dfx;
  view.x = log ? [Math.exp(a - d), Math.exp(b - d)] : [a - d, b - d];
  const e = (view.y[1] - view.y[0]) * dfy;
  view.y = [view.y[0] - e, view.y[1] - e];
  redraw();
}
function resetView() { view.x = null; view.y = null; redraw(); }
function redraw() { drawPlot(); paint(); }
const drag = {on: false, moved: false, at: null};

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
  const tip = $("tip"), c = D.costs[state.cost], x = X(r[c.key]), y = Y(r.acc1);
  tip.textContent = "";
  node("b", tip, "cfg_id " + r.cfg_id + (r.anchor ? " (anchor)" : ""));
  for (const [k, v] of facts(i, r)) node("div", tip, k + ": " + v);
  // other files' points drawn at the same place (e.g. the same anchor in two files): named too, else one hides them
  D.files.forEach((f, j) => f.records.forEach((o) => {
    if ((j !== i || o.cfg_id !== r.cfg_id) && Math.abs(X(o[c.key]) - x) < 3 && Math.abs(Y(o.acc1) - y) < 3) {
      node("div", tip, "also here: " + f.label + " cfg_id " + o.cfg_id + " (" + o.route + ")", "also");
    }
  }));
  tip.hidden = false;
  tip.dataset.cfgId = r.cfg_id;
  tip.dataset.file = i;
  moveTip(ev);
}
function moveTip(ev) {  // inside the plot's box: never over the side panel
  const tip = $("tip"), w = tip.offsetWidth, h = tip.offsetHeight, b = $("plot").getBoundingClientRect();
  let left = ev.clientX + 14, top = ev.clientY + 14;
  if (left + w > b.right - 4) left = ev.clientX - w - 14;
  if (top + h > b.bottom - 4) top = ev.clientY - h - 14;
  tip.style.left = Math.max(b.left + 4, Math.min(left, b.right - w - 4)) + "px";
  tip.style.top = Math.max(b.top + 4, Math.min(top, b.bottom - h - 4)) + "px";
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
  const c = D.costs[state.cost], f = D.files[i];
  $("sel-command").textContent = "this stitch: snnet select " + f.path + " " + c.flag + " " + String(r[c.key]) +
    (c.fronts[i].indexOf(cfg) >= 0 ? "" : "  (not on the front: a budget picks a better stitch)") +
    "\nsnnet export CKPT --cfg-id " + cfg + " --out export-" + f.label.replace(/[^A-Za-z0-9_.-]/g, "_") + "-cfg" +
    cfg + "   (CKPT: the checkpoint that wrote " + f.path + ")";
  $("sel-command").dataset.file = i;
  document.querySelectorAll("#stitches tbody tr").forEach((tr) => {
    const on = +tr.dataset.file === i && +tr.dataset.cfgId === cfg;
    tr.classList.toggle("sel", on);
    if (on && how !== "table") {  // scroll the table's own box only, never the page
      const box = tr.closest(".scroll");
      if (tr.offsetTop < box.scrollTop || tr.offsetTop + tr.offsetHeight > box.scrollTop + box.clientHeight) {
        box.scrollTop = tr.offsetTop - box.clientHeight / 2;
      }
    }
  });
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
          box).textContent = b.address || "cut";
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
function paint() {  // the budget's marks on the plot as it is drawn now
  const c = D.costs[state.cost], b = budgetAt(state.pos);
  const bx = Math.max(M.l, Math.min(W - M.r, X(b)));
  const line = $("budget-line");
  line.setAttribute("x1", bx);
  line.setAttribute("x2", bx);
  const zone = $("over-zone");
  zone.setAttribute("x", bx);
  zone.setAttribute("width", Math.max(0, W - M.r - bx));
  document.querySelectorAll("#plot .pt").forEach((p) =>
    p.classList.toggle("over", recs[+p.dataset.file].get(+p.dataset.cfgId)[c.key] > b));
  rings();
}
function update() {
  const c = D.costs[state.cost], b = budgetAt(state.pos), out = $("budget-value");
  out.dataset.budget = String(b);
  out.dataset.cost = c.key;
  out.textContent = "\u2264 " + fmtCost(c, b);
  $("budget").setAttribute("aria-valuetext", fmtCost(c, b));
  state.picks = D.files.map((f, i) => pickAt(c.steps[i], b));
  paint();
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
    tr.addEventListener("click", () => {
      state.focus = i;
      budgetCommand();
      if (p) choose(i, p.cfg, "best within the budget");
    });
  });
  budgetCommand();
  const p = state.picks[state.focus];
  if (p) choose(state.focus, p.cfg, "best within the budget");
  else rings();
}
function budgetCommand() {  // for the file whose row (or point) was chosen last, not always the first file
  const c = D.costs[state.cost], cmd = $("command");
  cmd.textContent = "= snnet select " + D.files[state.focus].path + " " + c.flag + " " + String(budgetAt(state.pos));
  cmd.dataset.file = state.focus;
}

// ---------------------------------------------------------------------------------------------- all stitches
const sort = {key: "cost", dir: 1};
function fillStitches() {
  const c = D.costs[state.cost], body = document.querySelector("#stitches tbody"), rows = [];
  D.files.forEach((f, i) => f.records.forEach((r) => rows.push({i: i, r: r, file: f.label, cfg_id: r.cfg_id,
    cost: r[c.key], acc1: r.acc1, front: c.fronts[i].indexOf(r.cfg_id) >= 0 ? 1 : 0})));
  const cmp = (a, b) => (a[sort.key] < b[sort.key] ? -1 : a[sort.key] > b[sort.key] ? 1 : 0);
  rows.sort((a, b) => cmp(a, b) * sort.dir || a.i - b.i || a.cfg_id - b.cfg_id);  // ties: file, then cfg_id
  body.textContent = "";
  for (const row of rows) {
    const tr = node("tr", body);
    tr.dataset.file = row.i;
    tr.dataset.cfgId = row.cfg_id;
    tr.tabIndex = 0;
    tr.title = row.r.route + (row.r.anchor ? " (anchor)" : "");  // the route on hover: the table stays narrow
    node("td", tr, row.file);
    node("td", tr, String(row.cfg_id) + (row.r.anchor ? " \u2605" : ""));
    node("td", tr, fmtCost(c, row.cost));
    node("td", tr, row.acc1.toFixed(2));
    node("td", tr, row.front ? "yes" : "");
    const pick = () => { state.focus = row.i; budgetCommand(); choose(row.i, row.cfg_id, "table"); };
    tr.addEventListener("click", pick);
    tr.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pick(); }
    });
    if (state.sel && state.sel.file === row.i && state.sel.cfg === row.cfg_id) tr.classList.add("sel");
  }
  document.querySelectorAll("#stitches th").forEach((th) => {
    th.classList.toggle("sorted", th.dataset.key === sort.key);
    th.dataset.dir = th.dataset.key === sort.key ? (sort.dir > 0 ? " \u25b2" : " \u25bc") : "";
  });
}
function images() {
  const box = $("images");
  D.files.forEach((f) => (f.images || []).forEach((im) => {
    const fig = node("figure", box), img = node("img", fig);
    img.src = im.src;
    img.alt = im.caption;
    img.dataset.name = im.name;
    node("figcaption", fig, f.label + ": " + im.name + " \u2014 " + im.caption);
  }));
  if (box.children.length) box.insertBefore(node("h2", null, "Sweep pictures"), box.firstChild);
}

function init() {
  const sel = $("cost");
  D.costs.forEach((c, k) => { const o = node("option", sel, c.name); o.value = k; });
  sel.value = String(state.cost);
  sel.addEventListener("change", () => {
    state.cost = +sel.value;
    view.x = null;
    drawPlot();
    update();
    fillStitches();
  });
  const c0 = D.costs[state.cost];
  $("xscale").value = c0.min > 0 && c0.max / c0.min >= 10 ? "log" : "linear";  // costs spanning decades: log
  $("xscale").addEventListener("change", resetView);
  $("reset").addEventListener("click", resetView);
  const plot = $("plot");
  plot.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const [fx, fy] = toData(ev);
    zoom(ev.deltaY < 0 ? 0.8 : 1.25, fx, fy);
  }, {passive: false});
  plot.addEventListener("keydown", (ev) => {  // the plot from the keyboard too: + - zoom, arrows pan, 0 resets
    const keys = {"+": () => zoom(0.8, 0.5, 0.5), "=": () => zoom(0.8, 0.5, 0.5), "-": () => zoom(1.25, 0.5, 0.5),
                  "0": resetView, ArrowLeft: () => pan(0.1, 0), ArrowRight: () => pan(-0.1, 0),
                  ArrowUp: () => pan(0, -0.1), ArrowDown: () => pan(0, 0.1)};
    if (keys[ev.key]) { ev.preventDefault(); keys[ev.key](); }
  });
  plot.addEventListener("mousedown", (ev) => { drag.on = true; drag.moved = false; drag.at = toData(ev); });
  window.addEventListener("mousemove", (ev) => {
    if (!drag.on) return;
    const at = toData(ev), dx = at[0] - drag.at[0], dy = at[1] - drag.at[1];
    if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 0.01) return;
    drag.moved = true;
    drag.at = at;
    hideTip();
    pan(dx, dy);
  });
  window.addEventListener("mouseup", () => { drag.on = false; setTimeout(() => { drag.moved = false; }, 0); });
  document.querySelectorAll("#stitches th").forEach((th) => th.addEventListener("click", () => {
    sort.dir = sort.key === th.dataset.key ? -sort.dir : 1;
    sort.key = th.dataset.key;
    fillStitches();
  }));
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
                       (D.files.length > 1 ? "   - - combined front" : "") + "   \u25ef best within the budget" +
                       (D.files.some((f) => f.baselines) ? "   - - random anchor mixing   \u00b7\u00b7 confidence " +
                        "cascade (no training; FLOPs axis)" : ""));
  drawPlot();
  fillStitches();
  update();
  images();
  document.body.dataset.ready = "1";
}
init();
})();
