"""The labelling page: one HTML document with a little plain JavaScript (no framework, nothing fetched from
elsewhere). Buttons and keys: A better (a or 1), B better (b or 2), tie (t or 3), both bad (x or 4), undo (u or
Backspace). The access token is read from the page's address and sent on each call; the page names itself with
a random client id (kept for the tab's life), so its undo withdraws its own latest verdict."""

HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>alignpipe: which answer is better?</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
 header { display: flex; justify-content: space-between; align-items: baseline; }
 #progress { font-variant-numeric: tabular-nums; color: #555; }
 .prompt { background: #f3f3f3; border-radius: 6px; padding: 1rem; white-space: pre-wrap; margin: 1rem 0; }
 .answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
 .answer { border: 2px solid #ccc; border-radius: 6px; padding: 1rem; white-space: pre-wrap; min-height: 4rem; }
 .answer h2 { margin: 0 0 .5rem; font-size: 1rem; color: #666; }
 .buttons { display: flex; gap: .5rem; flex-wrap: wrap; margin: 1rem 0; }
 button { font-size: 1rem; padding: .5rem 1rem; border-radius: 6px; border: 1px solid #888; background: #fff; cursor: pointer; }
 button:hover { background: #eef; }
 kbd { font-size: .8rem; border: 1px solid #aaa; border-radius: 3px; padding: 0 .25rem; margin-left: .3rem; }
 #done { font-size: 1.2rem; color: #060; }
 #error { color: #a00; }
</style></head>
<body>
<header><h1>Which answer is better?</h1><span id="progress">loading</span></header>
<div id="task">
 <div class="prompt" id="prompt"></div>
 <div class="answers">
  <div class="answer"><h2>A</h2><div id="a"></div></div>
  <div class="answer"><h2>B</h2><div id="b"></div></div>
 </div>
 <div class="buttons">
  <button id="btn-a" data-verdict="a">A is better<kbd>a</kbd></button>
  <button id="btn-b" data-verdict="b">B is better<kbd>b</kbd></button>
  <button id="btn-tie" data-verdict="tie">Tie<kbd>t</kbd></button>
  <button id="btn-both_bad" data-verdict="both_bad">Both bad<kbd>x</kbd></button>
 </div>
</div>
<p id="done" hidden>Every queued pair is labelled. Thank you.</p>
<div class="buttons"><button id="btn-undo">Undo<kbd>u</kbd></button></div>
<p id="error"></p>
<script>
const token = new URLSearchParams(location.search).get("token") || "";
function clientId() {
  let id = sessionStorage.getItem("alignpipe-client");
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(12));
    id = Array.from(bytes, b => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("alignpipe-client", id);
  }
  return id;
}
const headers = {"Content-Type": "application/json", "X-Alignpipe-Token": token, "X-Alignpipe-Client": clientId()};
let current = null, busy = false;

function show(state) {
  current = state.item;
  document.getElementById("progress").textContent =
    state.labelled + " / " + state.total + " labelled" + (state.target < state.total ? " (needed: " + state.target + ")" : "");
  document.getElementById("task").hidden = !current;
  document.getElementById("done").hidden = !!current;
  if (current) {
    document.getElementById("prompt").textContent = current.prompt;
    document.getElementById("a").textContent = current.a;
    document.getElementById("b").textContent = current.b;
  }
}
async function call(method, path, body) {
  if (busy) return;
  busy = true;
  try {
    const r = await fetch(path, {method, headers, body: body ? JSON.stringify(body) : undefined});
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.status);
    document.getElementById("error").textContent = "";
    show(data);
  } catch (e) {
    document.getElementById("error").textContent = "not saved: " + e.message;
  } finally { busy = false; }
}
function verdict(v) { if (current) call("POST", "/api/label", {id: current.id, verdict: v}); }
document.querySelectorAll("button[data-verdict]").forEach(b => b.addEventListener("click", () => verdict(b.dataset.verdict)));
document.getElementById("btn-undo").addEventListener("click", () => call("POST", "/api/undo", {}));
const keys = {a: "a", "1": "a", b: "b", "2": "b", t: "tie", "3": "tie", x: "both_bad", "4": "both_bad"};
document.addEventListener("keydown", e => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "u" || e.key === "Backspace") { e.preventDefault(); call("POST", "/api/undo", {}); }
  else if (keys[e.key]) verdict(keys[e.key]);
});
call("GET", "/api/state");
</script>
</body></html>
"""
