"""The web page (:mod:`lrq.web` serves it at ``/``): one HTML file, inline CSS and script.

The script builds every element with ``createElement`` and fills it with ``textContent``
(never ``innerHTML``), so a batch item or an error holding ``<script>`` shows as text. The
Content-Security-Policy (:func:`csp`) allows only this page's own script, by its hash, as a
second line of defence. It polls ``/api/status`` every 2 s (only while the tab is visible)
and the throughput and problems every 10 s. The POST token is asked for once and kept in
``sessionStorage``; it goes out as an ``Authorization`` header, never a cookie.
"""
from __future__ import annotations

import base64
import functools
import hashlib

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(2);
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}
function human(n) {
  const u = ["B", "kB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return n.toFixed(i ? 1 : 0) + " " + u[i];
}
function say(text, bad) { const m = $("message"); m.textContent = text; m.className = bad ? "bad" : "ok"; }
function token() { return sessionStorage.getItem("lrq-token"); }
async function post(path) {
  if (!token()) { $("tokenbox").hidden = false; say("enter the token first (lrq web prints where it is)", true); return null; }
  const r = await fetch(path, {method: "POST", headers: {"Authorization": "Bearer " + token()}});
  const body = await r.json().catch(() => ({}));
  if (r.status === 401 || r.status === 403) {
    sessionStorage.removeItem("lrq-token"); $("tokenbox").hidden = false;
    say("token refused (" + r.status + "): enter it again", true); return null;
  }
  if (!r.ok) { say(path + ": " + (body.error || r.status), true); return null; }
  say(path + ": done", false); refresh(); problems(); return body;
}
function button(text, action, cls) {
  const b = el("button", text, cls); b.addEventListener("click", action); return b;
}
function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  return s >= 3600 ? Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m"
       : s >= 60 ? Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s" : s + "s";
}
function rateText(q) {
  const r = q.rates || {}, w1 = r["60s"], w10 = r["600s"], out = [];
  if (w1) out.push(fmt(w1.items_per_s) + " items/s (1 min)");
  if (w10) out.push(fmt(w10.items_per_s) + " (10 min)");
  if (q.eta_seconds !== null && q.eta_seconds !== undefined) out.push("backlog ETA " + duration(q.eta_seconds));
  if (q.remaining !== null && q.remaining !== undefined) out.push(fmt(q.remaining) + " left in source" +
      (q.eta_remaining_seconds !== null && q.eta_remaining_seconds !== undefined ? ", ETA " + duration(q.eta_remaining_seconds) : ""));
  return out.join("; ");
}
function queueRows(st) {
  const body = $("queues"); body.replaceChildren();
  for (const [name, q] of Object.entries(st.queues || {})) {
    const tr = el("tr"); tr.dataset.queue = name;
    const paused = q.paused && (q.paused === true || typeof q.paused === "object");
    tr.append(el("td", name), el("td", paused ? "paused" : "active", "state " + (paused ? "paused" : "active")));
    for (const k of ["pending", "claimed", "done", "failed", "quarantined", "stale", "results", "dead_letters"])
      tr.append(el("td", fmt(q[k]), "num"));
    tr.append(el("td", rateText(q) || "-", "rates"));
    const acts = el("td");
    acts.append(paused
      ? button("Resume", () => post("/api/queues/" + encodeURIComponent(name) + "/resume"), "resume")
      : button("Pause", () => post("/api/queues/" + encodeURIComponent(name) + "/pause"), "pause"));
    if (q.failed) acts.append(button("Requeue failed", () => post("/api/requeue-failed?queue=" + encodeURIComponent(name)), "requeue-failed"));
    tr.append(acts);
    if (paused && typeof q.paused === "object") tr.title = "paused " + fmt(q.paused);
    body.append(tr);
  }
  const d = st.disk || {};
  const share = d.max_bytes ? Math.min(1, d.used / d.max_bytes) : 0;
  $("diskbar").style.width = (share * 100).toFixed(1) + "%";
  $("disktext").textContent = human(d.used || 0) + " of budget " + human(d.max_bytes || 0) +
    " (" + (share * 100).toFixed(0) + "%); filesystem free " + human(d.free_bytes || 0) +
    ", " + fmt(d.free_inodes) + " inodes free" + (d.blocked ? "; BLOCKED: " + d.blocked : "") +
    (d.below_min_free ? "; " + d.below_min_free : "");
  $("dberror").textContent = st.database && st.database.error ? "database: " + st.database.error : "";
}
async function refresh() {
  try {
    const r = await fetch("/api/status"); queueRows(await r.json());
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) { say("status: " + e, true); }
}
function chart(data) {
  const svg = $("chart"); svg.replaceChildren();
  const NS = "http://www.w3.org/2000/svg", W = 600, H = 120;
  if (!data.minutes) { $("charterror").textContent = data.error || ""; return; }
  const n = data.minutes.length, totals = new Array(n).fill(0);
  for (const q of Object.values(data.queues)) q.items.forEach((v, i) => { totals[i] += v; });
  const max = Math.max(1, ...totals), w = W / n;
  totals.forEach((v, i) => {
    const r = document.createElementNS(NS, "rect"), h = v / max * (H - 12);
    r.setAttribute("x", String(i * w)); r.setAttribute("width", String(Math.max(1, w - 1)));
    r.setAttribute("y", String(H - h)); r.setAttribute("height", String(h));
    const t = document.createElementNS(NS, "title"); t.textContent = data.minutes[i] + ": " + v + " items";
    r.append(t); svg.append(r);
  });
  const label = document.createElementNS(NS, "text");
  label.setAttribute("x", "2"); label.setAttribute("y", "10");
  label.textContent = "max " + max + " items/min"; svg.append(label);
}
async function throughput() {
  try { chart(await (await fetch("/api/throughput")).json()); } catch (e) { say("throughput: " + e, true); }
}
async function problems() {
  let data;
  try { data = await (await fetch("/api/problems")).json(); } catch (e) { say("problems: " + e, true); return; }
  const fb = $("failed"), dl = $("dead"); fb.replaceChildren(); dl.replaceChildren();
  for (const [queue, p] of Object.entries(data)) {
    for (const f of p.failed || []) {
      const tr = el("tr"); tr.dataset.batch = f.name;
      tr.append(el("td", queue), el("td", f.name), el("td", f.quarantined ? "quarantined" : "failed"),
                el("td", new Date(f.failed_at * 1000).toLocaleString()), el("td", f.error, "error"));
      const act = el("td");
      if (!f.quarantined) act.append(button("Requeue", () => post("/api/batches/" + encodeURIComponent(f.name) + "/requeue"), "requeue"));
      tr.append(act); fb.append(tr);
    }
    for (const d of p.dead_letters || []) {
      const tr = el("tr");
      tr.append(el("td", queue), el("td", d.key), el("td", d.batch), el("td", fmt(d.created_at)), el("td", d.error, "error"));
      dl.append(tr);
    }
    if (p.error) dl.append(el("tr", queue + ": " + p.error));
  }
}
$("tokenform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const v = $("token").value.trim();
  if (v) { sessionStorage.setItem("lrq-token", v); $("token").value = ""; $("tokenbox").hidden = true; say("token kept for this tab", false); }
});
$("cleanup").addEventListener("click", () => post("/api/cleanup"));
$("tokenbox").hidden = !!token();
function tick(every, f) { f(); setInterval(() => { if (!document.hidden) f(); }, every); }
tick(2000, refresh); tick(10000, throughput); tick(10000, problems);
"""

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.error { white-space: pre-wrap; font-family: monospace; max-width: 60em; max-height: 8em; overflow: auto; display: block; }
.state.paused { color: #b60; font-weight: bold; } .state.active { color: #070; }
#diskouter { width: 30em; height: 1em; background: #eee; border: 1px solid #ccc; }
#diskbar { height: 100%; background: #48c; width: 0; }
#chart { width: 600px; height: 120px; background: #fafafa; border: 1px solid #ddd; }
#chart rect { fill: #48c; } #chart text { font-size: 10px; fill: #555; }
.bad { color: #b00; } .ok { color: #070; }
button { margin-right: .4em; }
"""

PAGE = ("<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>lrq</title>"
        "<meta name=viewport content='width=device-width'>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>lrq</h1><p><span id=updated></span> <span id=message></span> "
        "<span id=dberror class=bad></span></p>"
        "<div id=tokenbox hidden><form id=tokenform>Token for actions "
        "(config http_token, env LRQ_HTTP_TOKEN or data_dir/http.token): "
        "<input id=token type=password autocomplete=off> <button type=submit>Keep</button>"
        "</form></div>"
        "<h2>Queues</h2><table><thead><tr><th>queue</th><th>state</th><th>pending</th>"
        "<th>claimed</th><th>done</th><th>failed</th><th>quarantined</th><th>stale</th>"
        "<th>results</th><th>dead letters</th><th>rates, ETA</th><th></th></tr></thead>"
        "<tbody id=queues></tbody></table>"
        "<h2>Disk</h2><div id=diskouter><div id=diskbar></div></div><p id=disktext></p>"
        "<button id=cleanup>Run cleanup</button>"
        "<h2>Throughput, last hour (items per minute)</h2>"
        "<svg id=chart viewBox='0 0 600 120' preserveAspectRatio=none></svg>"
        "<p id=charterror class=bad></p>"
        "<h2>Failed batches</h2><table><thead><tr><th>queue</th><th>batch</th><th>state</th>"
        "<th>failed at</th><th>error</th><th></th></tr></thead><tbody id=failed></tbody></table>"
        "<h2>Dead letters</h2><table><thead><tr><th>queue</th><th>key</th><th>batch</th>"
        "<th>at</th><th>error</th></tr></thead><tbody id=dead></tbody></table>"
        f"<script>{SCRIPT}</script></body></html>\n")


@functools.cache
def csp() -> str:
    """The page's Content-Security-Policy: its own inline script (by hash) and style,
    requests to its own origin only, no frames, forms only to itself."""
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    return ("default-src 'none'; script-src 'sha256-" + digest + "'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
            "base-uri 'none'")
