"""The page of `alignpipe ui`: one HTML document, plain JavaScript and CSS, and the vendored uPlot (MIT, 51 kB
minified; static/uPlot.LICENSE) inlined into it for the curves (drag to zoom, double-click to reset, hover to
read a point). Nothing is fetched from elsewhere and there is no build step: the page is this string.

Views (the part after `#` in the address, so the access token in `?token=` stays where it is):
    #/                          the runs, each with its lineage graph, live while a run is going
    #/stage/<run>/<stage>       manifest, curves, did it help / did it hurt, gates, progress
    #/samples/<run>/<stage>     held-out samples beside the parent's, with filters
    #/compare/<run>/<stage>,... two or more stages or runs side by side (report/compare.py)
    #/chat/<run>/<stage>,...    stages answering the same chat message side by side, streamed (ui/chat.py)
Every text from a run folder is put on the page as text (textContent), never as HTML.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

STATIC = Path(__file__).parent / "static"

STYLE = """
 body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
 header { background: #243447; color: #fff; padding: .6rem 1.2rem; display: flex; gap: 1.2rem; align-items: baseline; }
 header a { color: #cfe3ff; text-decoration: none; } header h1 { font-size: 1.1rem; margin: 0; }
 main { padding: 1rem 1.2rem; max-width: 80rem; }
 h2 { font-size: 1.1rem; margin: 1.4rem 0 .5rem; } h3 { font-size: 1rem; margin: 1rem 0 .4rem; }
 .run { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .6rem 1rem; margin-bottom: 1rem; }
 .muted { color: #666; } .error { color: #a00; } .small { font-size: .85rem; }
 table { border-collapse: collapse; font-size: .9rem; margin: .3rem 0; }
 th, td { border-bottom: 1px solid #e3e3e3; padding: .25rem .6rem; text-align: left; vertical-align: top; }
 td.num { text-align: right; font-variant-numeric: tabular-nums; }
 svg.lineage { display: block; overflow: visible; }
 svg .node rect { fill: #fff; stroke: #888; stroke-width: 1.5; rx: 6; }
 svg .node:hover rect { stroke: #245; stroke-width: 2.5; cursor: pointer; }
 svg .node text { font-size: 12px; } svg .node .name { font-weight: 600; font-size: 13px; }
 svg .edge { stroke: #999; stroke-width: 1.5; fill: none; }
 .s-complete rect { stroke: #2a7a2a !important; } .s-running rect { stroke: #1f5fbf !important; }
 .s-failed rect, .s-stopped rect, .s-interrupted rect { stroke: #b22 !important; }
 .s-pending rect { stroke-dasharray: 4 3; }
 .badge { display: inline-block; padding: 0 .4rem; border-radius: 3px; font-size: .8rem; color: #fff; background: #777; }
 .b-complete { background: #2a7a2a; } .b-running { background: #1f5fbf; } .b-failed, .b-stopped, .b-interrupted { background: #b22; }
 .bar { background: #e6e6e6; border-radius: 3px; height: .7rem; width: 18rem; display: inline-block; vertical-align: middle; }
 .bar > div { background: #1f5fbf; height: 100%; border-radius: 3px; }
 .curves { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: .8rem; }
 .curve { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .3rem; }
 .pair { display: grid; grid-template-columns: 1fr 1fr; gap: .6rem; }
 .sample { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem .8rem; margin: .5rem 0; }
 .prompt { font-weight: 600; margin-bottom: .3rem; }
 .resp { white-space: pre-wrap; overflow-wrap: anywhere; background: #f4f4f4; border-radius: 4px; padding: .4rem; min-height: 1.2rem; }
 .pass { color: #2a7a2a; } .fail { color: #b22; }
 .filters label { margin-right: 1rem; } button, select { font-size: .9rem; }
 pre { background: #fff; border: 1px solid #ddd; padding: .5rem; overflow: auto; max-height: 28rem; font-size: .8rem; }
 .chat-column .prompt { margin-top: .6rem; }
 .cols { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: .8rem; }
"""

SCRIPT = r"""
const token = new URLSearchParams(location.search).get("token") || "";
let timer = null;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : String(kid));
  return e;
}
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid instanceof Node ? kid : String(kid));
  return e;
}
async function api(path, body) {
  const r = await fetch(path, {method: body ? "POST" : "GET", headers: {"X-Alignpipe-Token": token,
    "Content-Type": "application/json"}, body: body ? JSON.stringify(body) : undefined});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.status);
  return data;
}
function q(params) { return "?" + new URLSearchParams(params).toString(); }
function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : (Math.abs(v) >= 100 ? v.toFixed(1) : v.toFixed(3));
  return String(v);
}
function pct(v) { return v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%"; }
function clock(s) {
  if (s === null || s === undefined) return "-";
  s = Math.max(0, Math.round(s)); const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), x = s % 60;
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(x).padStart(2, "0");
}
function link(hash, text) { return el("a", {href: "#" + hash}, text); }
function enc(s) { return encodeURIComponent(s); }
function badge(status) { return el("span", {class: "badge b-" + status}, status); }
function progressText(p) {
  if (!p) return "";
  return p.label + ": " + p.n + "/" + p.total + " " + p.unit + (p.rate > 0 ? ", " + (p.rate >= 1 ? p.rate.toFixed(1) + " " + p.unit + "/s" : (1 / p.rate).toFixed(1) + " s/" + p.unit) : "") +
    (p.n < p.total ? ", ETA " + clock(p.eta_s) : ", done in " + clock(p.elapsed_s));
}
function progressBar(p) {
  const share = p && p.total ? Math.min(1, p.n / p.total) : 0;
  return el("span", {}, el("span", {class: "bar"}, el("div", {style: "width:" + (100 * share).toFixed(1) + "%"})), " ",
            el("span", {class: "progress-text small"}, progressText(p)));
}
function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, head.map(h => el("th", {}, h)))),
    el("tbody", {}, rows.map(r => el("tr", {}, r.map(c => c instanceof Node ? el("td", {}, c) :
      el("td", {class: typeof c === "number" ? "num" : ""}, fmt(c)))))));
}
function repeat(fn, ms) { clearTimeout(timer); timer = setTimeout(fn, ms); }

// --- the lineage graph ---------------------------------------------------------------------------
function depths(nodes) {
  const by = Object.fromEntries(nodes.map(n => [n.stage, n])), depth = {};
  const d = (n, seen) => { if (depth[n.stage] !== undefined) return depth[n.stage];
    const p = n.parent && by[n.parent] && !seen.has(n.parent) ? d(by[n.parent], new Set([...seen, n.stage])) + 1 : 0;
    return depth[n.stage] = p; };
  nodes.forEach(n => d(n, new Set([n.stage])));
  return depth;
}
function lineageGraph(run) {
  const W = 236, H = 86, GX = 40, GY = 14, nodes = run.stages, depth = depths(nodes), rows = {}, at = {};
  for (const n of nodes) { const c = depth[n.stage]; rows[c] = (rows[c] || 0) + 1; at[n.stage] = [c, rows[c] - 1]; }
  const cols = Math.max(0, ...Object.keys(rows).map(Number)) + 1, tall = Math.max(1, ...Object.values(rows));
  const g = svg("svg", {class: "lineage", width: cols * (W + GX), height: tall * (H + GY), "data-run": run.name});
  const xy = s => [at[s][0] * (W + GX), at[s][1] * (H + GY)];
  for (const n of nodes) if (n.parent && at[n.parent]) {
    const [x1, y1] = xy(n.parent), [x2, y2] = xy(n.stage);
    g.append(svg("path", {class: "edge", "data-from": n.parent, "data-to": n.stage,
      d: `M${x1 + W},${y1 + H / 2} C${x1 + W + GX / 2},${y1 + H / 2} ${x2 - GX / 2},${y2 + H / 2} ${x2},${y2 + H / 2}`}));
  }
  for (const n of nodes) {
    const [x, y] = xy(n.stage), live = n.attempt && n.attempt.status === "running" ? n.attempt : n;
    const status = live === n ? n.status : "running";
    const lines = Object.entries(n.headline).slice(0, live.progress ? 1 : 2).map(([k, v]) => k + " " + fmt(v));
    const kept = n.history.length ? ", " + n.history.length + " kept" : "";
    const state = live === n ? status + (n.version ? " · v" + n.version : "") :
      "v" + n.version + " " + n.status + ", v" + live.version + " running";
    const node = svg("g", {class: "node s-" + status, transform: `translate(${x},${y})`, "data-stage": n.stage,
      "data-status": status, "data-parent": n.parent || "", tabindex: 0});
    node.append(svg("rect", {width: W, height: H}),
      svg("text", {x: 8, y: 17, class: "name"}, n.stage),
      svg("text", {x: 8, y: 32}, n.kind + " · " + state + kept),
      ...lines.map((t, i) => svg("text", {x: 8, y: 48 + 14 * i, class: "metric"}, t)));
    if (live.progress) {
      const p = live.progress, share = p.total ? Math.min(1, p.n / p.total) : 0;
      node.append(svg("rect", {x: 8, y: H - 12, width: W - 16, height: 6, style: "fill:#e6e6e6;stroke:none"}),
        svg("rect", {x: 8, y: H - 12, width: (W - 16) * share, height: 6, style: "fill:#1f5fbf;stroke:none"}),
        svg("text", {x: 8, y: H - 17, class: "eta"}, p.label.split(" ").slice(2).join(" ") + " " + p.n + "/" + p.total +
          (p.n < p.total ? " · ETA " + clock(p.eta_s) : "")),
        svg("title", {}, progressText(p)));
    }
    if (status !== "pending") node.addEventListener("click", () => location.hash = "#/stage/" + enc(run.name) + "/" + enc(n.stage));
    g.append(node);
  }
  return g;
}

// --- views ---------------------------------------------------------------------------------------
async function runsView(main) {
  const data = await api("/api/runs");
  main.replaceChildren(el("p", {class: "muted small"}, "Run folders under " + data.root + ". Click a stage for its page."));
  if (!data.runs.length) main.append(el("p", {}, "No runs yet: alignpipe run RECIPE writes them here."));
  for (const run of data.runs) {
    const rows = run.stages.map(n => {
      const live = n.attempt && n.attempt.status === "running" ? n.attempt : (n.status === "running" ? n : null);
      return [n.status === "complete" ? el("input", {type: "checkbox", class: "pick", value: run.name + "/" + n.stage}) : "",
        n.status === "pending" ? n.stage : link("/stage/" + enc(run.name) + "/" + enc(n.stage), n.stage), n.kind,
        badge(n.status), n.version || "-", n.history.map(h => "v" + h.version).join(", ") || "-",
        Object.entries(n.headline).map(([k, v]) => k + " " + fmt(v)).join("; ") || "-",
        live && live.progress ? progressBar(live.progress) : (live ? "starting" : "")];
    });
    main.append(el("section", {class: "run", "data-run": run.name},
      el("h2", {}, run.name, " ", run.running ? badge("running") : ""),
      lineageGraph(run),
      table(["", "stage", "kind", "status", "version", "history", "headline metrics", "progress"], rows)));
  }
  if (data.runs.length) main.append(el("p", {}, el("button", {id: "compare-picked", onclick: () => {
    const picked = [...document.querySelectorAll("input.pick:checked")].map(x => x.value.split("/").map(enc).join("/"));
    if (picked.length >= 2) location.hash = "#/compare/" + picked.join(","); else alert("check two or more stages");
  }}, "compare the checked stages"), " ", el("button", {id: "chat-picked", onclick: () => {
    const picked = [...document.querySelectorAll("input.pick:checked")].map(x => x.value.split("/").map(enc).join("/"));
    if (picked.length >= 1) location.hash = "#/chat/" + picked.join(","); else alert("check one or more stages");
  }}, "chat with the checked stages"), el("span", {class: "muted small"}, " (two or more, of one run or several)")));
  // refreshed while nothing is checked (a refresh would clear the choice of stages to compare)
  const again = () => document.querySelector("input.pick:checked") ? repeat(again, 4000) : route();
  repeat(again, data.runs.some(r => r.running) ? 1500 : 4000);
}

let shown = {key: null, live: false, charts: {}};  // the stage page on screen: updated in place while it trains

function curvePanel(name, xs, ys, xlabel) {
  const box = el("div", {class: "curve", "data-series": name});
  setTimeout(() => {
    const opts = {title: name, width: Math.max(340, box.clientWidth - 8), height: 200, cursor: {drag: {x: true, y: false}},
      scales: {x: {time: false}}, axes: [{label: xlabel}, {}],
      series: [{label: xlabel}, {label: name, stroke: "#1f5fbf", width: 1.5, points: {show: xs.length < 60}}]};
    shown.charts[name] = new uPlot(opts, [xs, ys], box);
  }, 0);
  return box;
}
function updateLive(d) {
  // a training stage's page, refreshed: the progress and the curves' data change, the rest (and the scroll) stays
  document.getElementById("progress").replaceChildren(d.progress ? progressBar(d.progress) : "running: no progress reported yet");
  const grid = document.getElementById("curves");
  for (const [name, [xs, ys]] of Object.entries(d.curves.series)) {
    if (shown.charts[name]) shown.charts[name].setData([xs, ys]);
    else { if (!grid.querySelector(".curve")) grid.replaceChildren(); grid.append(curvePanel(name, xs, ys, d.curves.xlabel)); }
  }
}

function verdictSection(v) {
  if (!v) return el("p", {class: "muted"}, "No verdicts (the stage is not complete, or not a policy with samples).");
  if (v.error) return el("p", {class: "error"}, v.error);
  const rows = v.rows.map(r => [r.judge, r.vs || "parent", el("span", {}, pct(r.rate) + " [" + pct(r.lo) + ", " + pct(r.hi) + "]"),
    el("strong", {class: "verdict"}, r.verdict), r.greedy ? pct(r.greedy.rate) + " [" + pct(r.greedy.lo) + ", " + pct(r.greedy.hi) + "] " + r.greedy.verdict : "-"]);
  const out = el("div", {id: "verdicts"}, rows.length ? table(["judge", "against", "win rate [95% CI]", "verdict", "against the greedy parent"], rows)
    : el("p", {class: "muted"}, "No win rates against a parent."));
  if (v.unmeasured) out.append(el("p", {}, "Not measured independently: " + v.unmeasured));
  if (v.health) out.append(el("h3", {}, "Did it hurt: response health"), table(Object.keys(v.health).filter(k => k !== "stage" && k !== "verifiers"),
    [Object.entries(v.health).filter(([k]) => k !== "stage" && k !== "verifiers").map(([, x]) => x)]));
  for (const n of v.notes) out.append(el("p", {class: "error small"}, n.join(": ")));
  return out;
}

async function stageView(main, run, stage) {
  const d = await api("/api/stage" + q({run, stage})), n = d.node, m = d.manifest;
  const live = d.manifest.status === "running", key = run + "/" + stage;
  if (live && shown.live && shown.key === key && document.getElementById("curves")) {
    updateLive(d);
    return repeat(route, 1000);
  }
  shown = {key, live, charts: {}};
  const actions = el("p", {}, link("/", "all runs"), " · ",
    d.samples ? link("/samples/" + enc(run) + "/" + enc(stage), "samples beside the parent's") : el("span", {class: "muted"}, "no samples"),
    n.parent ? [" · ", link("/compare/" + enc(run) + "/" + enc(n.parent) + "," + enc(run) + "/" + enc(stage), "compare with " + n.parent)] : "",
    n.history.length ? [" · ", link("/compare/" + enc(run) + "/" + enc(stage), "compare with its versions in history")] : "",
    n.parent && m.status === "complete" ? [" · ", link("/chat/" + enc(run) + "/" + enc(n.parent) + "," + enc(run) + "/" + enc(stage), "chat with it beside " + n.parent)] : "");
  if (d.labelling) actions.append(" · ", el("button", {id: "open-labelling", onclick: async () => {
    const r = await api("/api/labelling", {run, stage}); window.open(r.url, "_blank", "noopener"); }}, "open the labelling page"));
  main.replaceChildren(el("h2", {}, run + " / " + stage + " ", badge(live ? "running" : d.manifest.status || n.status)),
    el("p", {class: "muted"}, (m.kind || n.kind) + ", version " + (m.version || 1) + (d.attempt ? " (a new attempt beside the current version, in " + d.folder + ")" : "") +
      ", started " + (m.started_at || "-") + ", wall time " + clock(m.wall_time_s) + (m.lineage ? ", lineage " + [...m.lineage, stage].join(" → ") : "")),
    actions,
    el("div", {id: "progress", "data-status": live ? "running" : (m.status || "")}, live ? (d.progress ? progressBar(d.progress) : "running: no progress reported yet (loading its data and model)") :
      (d.progress ? "last step: " + progressText(d.progress) : "")));
  if (m.error) main.append(el("pre", {class: "error"}, m.error));
  main.append(el("h2", {}, "Curves"), el("p", {class: "muted small"}, "From " + d.curves.source + " (" + d.curves.rows + " rows). Drag to zoom, double-click to reset."));
  const grid = el("div", {class: "curves", id: "curves"});
  for (const [name, [xs, ys]] of Object.entries(d.curves.series)) grid.append(curvePanel(name, xs, ys, d.curves.xlabel));
  if (!Object.keys(d.curves.series).length) grid.append(el("p", {class: "muted"}, "No curves logged yet."));
  main.append(grid, el("h2", {id: "help"}, "Did it help? Did it hurt?"), verdictSection(d.verdicts));
  main.append(el("h2", {}, "Gates"), d.gates.length ? table(["gate", "value", "threshold", "passed"], d.gates.map(g => [g.expr, g.value, g.threshold, g.passed ? "passed" : "MISSED" + (g.reason ? ": " + g.reason : "")])) : el("p", {class: "muted"}, "No gates."));
  const scalars = Object.entries(d.metrics).filter(([, v]) => v === null || typeof v !== "object");
  if (scalars.length) main.append(el("h2", {}, "Metrics"), table(["metric", "value"], scalars));
  main.append(el("h2", {}, "Manifest"), ...["resolved_config", "inputs", "parent", "base_model", "versions", "machine"].filter(k => m[k]).map(k =>
    el("details", {}, el("summary", {}, k), el("pre", {}, JSON.stringify(m[k], null, 2)))));
  if (n.history.length) main.append(el("h3", {}, "Versions kept in history"), table(["version", "status", "started", "headline"],
    n.history.map(h => ["v" + h.version, h.status, h.started_at, Object.entries(h.headline).map(([k, v]) => k + " " + fmt(v)).join("; ")])));
  if (live || (n.attempt && n.attempt.status === "running")) repeat(route, 1000);
}

function verdictMarks(own) {
  return Object.entries(own).map(([k, v]) => el("span", {class: v ? "pass" : "fail"}, " " + k + (v ? " ✓" : " ✗")));
}
function responseSide(who, marks, reward, cutOff, tokens, text, cls) {
  return el("div", {}, el("div", {class: "small"}, el("strong", {}, who), verdictMarks(marks),
      reward !== null && reward !== undefined ? " reward " + fmt(reward) : "", cutOff ? el("span", {class: "fail"}, " cut off") : "",
      tokens !== undefined ? " · " + fmt(tokens) + " tokens" : ""),
    el("div", {class: "resp " + cls}, text === null || text === undefined ? "(no parent sample)" : text));
}
function sampleCard(r, stage, parent) {
  const prefers = Object.entries(r.outcomes).map(([j, v]) => j + " → " + (v > 0 ? stage : v < 0 ? parent : "even"));
  return el("div", {class: "sample" + (r.disagree ? " disagree" : "")},
    el("div", {class: "prompt"}, r.prompt, r.kind ? el("span", {class: "muted small"}, "  (" + r.kind + ")") : ""),
    el("div", {class: "pair"},
      responseSide(stage, r.verifiers, r.reward, r.cut_off, r.tokens, r.response, "this"),
      responseSide(parent, r.parent_verifiers, r.parent_reward, r.parent_ended === false, undefined, r.parent_response, "parent")),
    prefers.length ? el("div", {class: "small muted"}, "prefers: " + prefers.join("; ")) : "");
}
async function samplesView(main, run, stage) {
  const d = await api("/api/samples" + q({run, stage})), parent = d.parent || "parent";
  const box = id => el("input", {type: "checkbox", id});
  const f = {disagree: box("f-disagree"), failed: box("f-failed"), cut: box("f-cut"),
    kind: el("select", {id: "f-kind"}, el("option", {value: ""}, "every task kind"), d.kinds.map(k => el("option", {value: k}, k)))};
  const count = el("span", {id: "sample-count"}), list = el("div", {id: "samples"});
  function draw() {
    const shown = d.rows.filter(r => (!f.disagree.checked || r.disagree) && (!f.failed.checked || r.failed) &&
      (!f.cut.checked || r.cut_off) && (!f.kind.value || r.kind === f.kind.value));
    count.textContent = shown.length + " of " + d.rows.length + " samples" + (shown.length > 300 ? " (the first 300 drawn)" : "");
    list.replaceChildren(...shown.slice(0, 300).map(r => sampleCard(r, stage, parent)));
  }
  for (const x of Object.values(f)) x.addEventListener("change", draw);
  main.replaceChildren(el("h2", {}, run + " / " + stage + ": samples"), el("p", {}, link("/stage/" + enc(run) + "/" + enc(stage), "back to the stage"),
      d.left_out ? el("span", {class: "muted"}, " (" + d.left_out + " more rows not shown)") : ""),
    el("p", {class: "filters"}, el("label", {}, f.disagree, " judges disagree"), el("label", {}, f.failed, " failed"),
      el("label", {}, f.cut, " cut off"), f.kind, " ", count), list);
  draw();
}

async function compareView(main, targets) {
  const d = await api("/api/compare" + q(targets.map(t => ["target", t])));
  main.replaceChildren(el("h2", {}, "Compare: " + targets.join(", ")), el("p", {}, link("/", "all runs")), renderComparison(d));
}
/*COMPARE_JS*/

async function route() {
  clearTimeout(timer);
  const main = document.getElementById("main"), parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "stage" && parts.length === 3) await stageView(main, parts[1], parts[2]);
    else if (parts[0] === "samples" && parts.length === 3) await samplesView(main, parts[1], parts[2]);
    else if (parts[0] === "chat") await chatView(main, location.hash.replace(/^#\/chat\//, "").split(",").filter(Boolean).map(decodeURIComponent));
    else if (parts[0] === "compare") await compareView(main, location.hash.replace(/^#\/compare\//, "").split(",").filter(Boolean).map(decodeURIComponent));
    else await runsView(main);
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "could not load: " + e.message;
    repeat(route, 4000);
  }
}
window.addEventListener("hashchange", () => { shown.key = null; window.scrollTo(0, 0); route(); });
route();
"""

COMPARE_SCRIPT = r"""
// --- compare (report/compare.py's build_comparison, drawn) ------------------------------------------------
function cell(c) { return !c ? "-" : fmt(c.value) + (c.lo !== null && c.lo !== undefined ? " [" + fmt(c.lo) + ", " + fmt(c.hi) + "]" : "") + (c.n ? " n=" + c.n : ""); }
function overlaid(name, series, xlabel) {
  const labels = Object.keys(series), xs = [...new Set(labels.flatMap(l => series[l].x))].sort((a, b) => a - b);
  const data = [xs, ...labels.map(l => { const at = new Map(series[l].x.map((x, i) => [x, series[l].y[i]])); return xs.map(x => at.has(x) ? at.get(x) : null); })];
  const colours = ["#1f5fbf", "#d9480f", "#2b8a3e", "#862e9c", "#c92a2a", "#5c940d", "#0b7285", "#e67700"];
  const box = el("div", {class: "curve", "data-series": name});
  setTimeout(() => new uPlot({title: name, width: Math.max(340, box.clientWidth - 8), height: 220, scales: {x: {time: false}},
    cursor: {drag: {x: true, y: false}}, axes: [{label: xlabel}, {}],
    series: [{label: xlabel}, ...labels.map((l, i) => ({label: l, stroke: colours[i % colours.length], width: 1.5, spanGaps: true}))]}, data, box), 0);
  return box;
}
function renderComparison(d) {
  const out = el("div", {id: "comparison"}, table(["stage", "kind", "version", "status", "parent", "folder"],
    d.entries.map(e => [el("span", {class: "entry"}, e.label), e.kind, e.version + (e.current ? "" : " (history)"), e.status, e.parent || "-", e.path])));
  for (const g of d.groups) {
    const m = g.members, box = el("section", {class: "group", "data-group": g.name}, el("h2", {}, g.name));
    const diff = Object.entries(g.config.differs);
    box.append(el("h3", {}, "Resolved config: " + diff.length + " keys differ, " + g.config.same + " the same"),
      diff.length ? table(["key", ...m], diff.map(([k, v]) => [k, ...m.map(x => JSON.stringify(v[x] === undefined ? null : v[x]))])) : "");
    box.append(el("h3", {}, "Metrics (95% intervals)"), table(["metric", ...m], g.metrics.map(r => [r.metric, ...m.map(x => cell(r.values[x]))])));
    const h2h = g.head_to_head.flatMap(h => Object.entries(h.by_judge).map(([j, w]) => [h.a + " vs " + h.b, j === "reward" ? "reward model" : j,
      w.rate === null ? "-" : w.wins + "/" + w.ties + "/" + w.losses, w.rate === null ? "-" : pct(w.rate) + " [" + pct(w.lo) + ", " + pct(w.hi) + "]", el("strong", {}, w.verdict)]));
    box.append(el("h3", {}, "Head to head on the same held-out prompts"), h2h.length ? table(["pair", "judge", "W/T/L", "win rate [95% CI]", "verdict"], h2h) : el("p", {class: "muted"}, "No judge scored both stages' samples."),
      ...g.head_to_head.flatMap(h => h.left_out.map(w => el("p", {class: "muted small"}, h.a + " vs " + h.b + ": " + w))));
    const names = Object.keys(g.curves.metrics);
    if (names.length) box.append(el("h3", {}, "Training curves, overlaid"), el("div", {class: "curves"}, names.map(n => overlaid(n, g.curves.metrics[n], g.curves.xlabel))));
    out.append(box);
  }
  return out;
}
"""

CHAT_SCRIPT = r"""
// --- chat: stages answering the same message side by side, streamed (ui/chat.py) ------------------------
async function streamAnswer(target, messages, settings, into) {
  const [run, stage] = target.split("/");
  const r = await fetch("/api/chat", {method: "POST", headers: {"X-Alignpipe-Token": token, "Content-Type": "application/json"},
    body: JSON.stringify({run, stage, messages, ...settings})});
  if (!r.ok) { const e = await r.json(); throw new Error(e.error || r.status); }
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "", whole = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const chunk = JSON.parse(buffer.slice(0, cut)); buffer = buffer.slice(cut + 1);
      if (chunk.error) throw new Error(chunk.error);
      if (chunk.done) { whole = chunk; into.textContent = chunk.text; into.dataset.done = chunk.finish_reason; }
      else into.textContent += chunk.text;
    }
  }
  return whole ? whole.text : into.textContent;
}
async function chatView(main, targets) {
  const histories = Object.fromEntries(targets.map(t => [t, []]));
  const columns = Object.fromEntries(targets.map(t => [t, el("div", {class: "chat-column", "data-target": t})]));
  const input = el("textarea", {id: "chat-input", rows: 2, cols: 70, placeholder: "a message for every stage"});
  const temp = el("input", {id: "chat-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0, style: "width:4rem"});
  const send = el("button", {id: "chat-send"}, "send to all");
  send.addEventListener("click", async () => {
    const text = input.value.trim(); if (!text) return;
    input.value = ""; send.disabled = true;
    const settings = {temperature: Number(temp.value), seed: 0};
    await Promise.all(targets.map(async t => {
      histories[t].push({role: "user", content: text});
      const reply = el("div", {class: "resp this reply"});
      columns[t].append(el("div", {class: "prompt"}, text), reply);
      try { histories[t].push({role: "assistant", content: await streamAnswer(t, histories[t], settings, reply)}); }
      catch (e) { reply.append(el("span", {class: "error"}, " " + e.message)); histories[t].pop(); }
    }));
    send.disabled = false;
  });
  main.replaceChildren(el("h2", {}, "Chat: " + targets.join(" beside ")), el("p", {}, link("/", "all runs"),
      el("span", {class: "muted small"}, " · each stage answers as alignpipe serve does (greedy at temperature 0); the first message loads the models")),
    el("div", {class: "pair", style: "grid-template-columns: repeat(" + targets.length + ", 1fr)"}, targets.map(t => el("div", {}, el("h3", {}, t), columns[t]))),
    el("p", {}, input), el("p", {}, "temperature ", temp, " ", send));
}
"""

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>alignpipe runs</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>/*UPLOT_CSS*/</style><style>/*STYLE*/</style></head>
<body><header><h1><a href="#/">alignpipe</a></h1><span class="small">runs, lineage, curves, verdicts, samples</span></header>
<main><p id="error" class="error"></p><div id="main">loading</div></main>
<script>/*UPLOT_JS*/</script>
<script>/*SCRIPT*/</script>
</body></html>
"""


@lru_cache(maxsize=1)
def html() -> str:
    """The page, with uPlot's script and style inlined (the page's rules load nothing from elsewhere)."""
    parts = {"/*UPLOT_CSS*/": (STATIC / "uPlot.min.css").read_text(encoding="utf-8"), "/*STYLE*/": STYLE,
             "/*UPLOT_JS*/": (STATIC / "uPlot.iife.min.js").read_text(encoding="utf-8"),
             "/*SCRIPT*/": SCRIPT.replace("/*COMPARE_JS*/", COMPARE_SCRIPT + CHAT_SCRIPT)}
    out = TEMPLATE
    for key, value in parts.items():
        out = out.replace(key, value)
    return out
