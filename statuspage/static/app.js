// The status page: renders /api/state, then applies the server-sent events of /events.
// Every text from the supervisor goes into the DOM through textContent, never as HTML.
"use strict";

const page = { writes: false, csrf: null, actions: [], hosts: new Map(), order: [], open: new Set() };
const MAX_LOG = 200;
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || (v === false && !k.startsWith("data-"))) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, String(v));
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

// The sections `herd status` uses (docs/protocol.md, SVC).
function look(svc) {
  if (svc.state !== "stopped") return svc.state;
  if ((svc["startup-failures"] || []).length) return "failed";
  if (svc["one-shot"]) return "done";
  return "stopped";
}
const LABEL = { running: "running", starting: "starting", stopping: "stopping", stopped: "stopped",
  failed: "failed to start", done: "one-shot" };

function ago(t) {
  if (typeof t !== "number") return "–";
  let s = Math.max(0, Math.round(Date.now() / 1000 - t));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}
function since(t) { return el("span", { "data-since": t, title: typeof t === "number" ? new Date(t * 1000).toLocaleString() : "" }, ago(t)); }

function lastExit(e) {
  if (!e) return "–";
  if (e.signal) return "signal " + e.signal;
  return "exit " + e.code;
}

function clock(t) {
  const d = new Date(t * 1000);
  return d.toTimeString().slice(0, 8);
}

function logLines(lines) {
  const pre = el("pre", { class: "log" });
  for (const l of lines || []) pre.append(logLine(l));
  if (!(lines || []).length) pre.append(el("span", { class: "t" }, "no log lines yet"));
  return pre;
}
function logLine(l) {
  return el("div", { class: l.stream }, el("span", { class: "t" }, clock(l.time) + " " + l.stream + " "), l.line);
}

// -- the dependency graph: layers by longest chain of requirements, left (needed) to right --
function graph(host) {
  const names = host.services.map((s) => s.name);
  const byName = new Map(host.services.map((s) => [s.name, s]));
  const req = new Map(names.map((n) => [n, []]));
  for (const [a, b] of host.edges) if (req.has(a) && req.has(b)) req.get(a).push(b);
  const layer = new Map();
  const depth = (n, seen) => {
    if (layer.has(n)) return layer.get(n);
    if (seen.has(n)) return 0;
    seen.add(n);
    const d = req.get(n).length ? 1 + Math.max(...req.get(n).map((r) => depth(r, seen))) : 0;
    layer.set(n, d);
    return d;
  };
  names.forEach((n) => depth(n, new Set()));
  const cols = [];
  for (const n of names) (cols[layer.get(n)] = cols[layer.get(n)] || []).push(n);
  const W = 128, H = 30, GX = 40, GY = 14, P = 6;
  const width = Math.max(1, cols.length) * (W + GX) - GX + 2 * P;
  const height = Math.max(1, ...cols.map((c) => c.length)) * (H + GY) - GY + 2 * P;
  const pos = new Map();
  cols.forEach((col, i) => col.forEach((n, j) => pos.set(n, [P + i * (W + GX), P + j * (H + GY)])));
  const root = svg("svg", { class: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "dependency graph" });
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow-" + host.host.replace(/[^A-Za-z0-9_-]/g, "_"), viewBox: "0 0 8 8",
    refX: 7, refY: 4, markerWidth: 7, markerHeight: 7, orient: "auto" });
  const tip = svg("path", { d: "M0 0 8 4 0 8z", class: "arrow" });
  marker.append(tip); defs.append(marker); root.append(defs);
  for (const [a, b] of host.edges) {
    if (!pos.has(a) || !pos.has(b)) continue;
    const [ax, ay] = pos.get(a), [bx, by] = pos.get(b);
    const x1 = ax, y1 = ay + H / 2, x2 = bx + W, y2 = by + H / 2, mx = (x1 + x2) / 2;
    const path = svg("path", { class: "edge", d: `M${x1} ${y1} C${mx} ${y1} ${mx} ${y2} ${x2} ${y2}`,
      "marker-end": `url(#${marker.id})`, "data-from": a, "data-to": b });
    root.append(path);
  }
  for (const n of names) {
    const [x, y] = pos.get(n);
    const g = svg("g", { class: "node " + look(byName.get(n)), "data-node": n, transform: `translate(${x},${y})` });
    const title = svg("title"); title.textContent = n + ": " + LABEL[look(byName.get(n))];
    const rect = svg("rect", { width: W, height: H, rx: 8 });
    const text = svg("text", { x: W / 2, y: H / 2 + 4, "text-anchor": "middle" });
    text.textContent = n.length > 16 ? n.slice(0, 15) + "…" : n;
    g.append(title, rect, text); root.append(g);
  }
  return root;
}

// -- one host --
function serviceRows(host) {
  const rows = [];
  const can = page.actions.length && host.writable && host.connected;
  for (const s of host.services) {
    const key = host.host + "\u0000" + s.name;
    const state = look(s);
    const row = el("tr", { class: "svc", "data-host": host.host, "data-service": s.name, "data-state": s.state,
      "data-pid": s.pid === null ? "" : s.pid, "data-enabled": s.enabled,
      onclick: () => { page.open.has(key) ? page.open.delete(key) : page.open.add(key); renderHost(host.host); } },
      el("td", {}, el("span", { class: "pill " + state }, LABEL[state])),
      el("td", {}, el("span", { class: "name" }, s.name),
        (s.provides || []).some((p) => p !== s.name)
          ? el("span", { class: "aka" }, (s.provides || []).filter((p) => p !== s.name).join(", ")) : null,
        s.enabled ? null : el("span", { class: "tag", title: s["disabled-reason"] || "" }, "disabled")),
      el("td", { class: "num" }, s.pid === null ? "–" : s.pid),
      el("td", { class: "num" }, since(s.since)),
      el("td", { class: "num" }, Array.isArray(s.respawns) ? s.respawns.length : (s.respawns || 0)),
      el("td", { class: "num" }, lastExit(s["last-exit"])),
      el("td", { class: "actions" }, can ? page.actions.map((a) =>
        el("button", { "data-action": a, onclick: (ev) => { ev.stopPropagation(); act(host.host, a, s.name); } }, a)) : null));
    rows.push(row);
    const logRow = el("tr", { class: "log-row", "data-log-for": s.name, hidden: !page.open.has(key) },
      el("td", { colspan: 7 }, logLines((host.logs || {})[s.name])));
    rows.push(logRow);
  }
  return rows;
}

function hostSection(host) {
  const sup = host.supervisor || {};
  const counts = {};
  for (const s of host.services) counts[look(s)] = (counts[look(s)] || 0) + 1;
  const meta = el("dl", { class: "meta" },
    el("div", {}, el("dt", {}, "version"), el("dd", {}, sup.version || "–")),
    el("div", {}, el("dt", {}, "pid"), el("dd", { "data-field": "pid" }, sup.pid || "–")),
    el("div", {}, el("dt", {}, "up"), el("dd", {}, since(sup.since))),
    el("div", {}, el("dt", {}, "tracking"), el("dd", {}, (sup.containment || {}).mode || "–")),
    el("div", {}, el("dt", {}, "events"), el("dd", { title: "epoch " + (sup.epoch || "–") },
      "#" + (sup.seq === null || sup.seq === undefined ? "–" : sup.seq))));
  const badge = host.connected
    ? el("span", { class: "pill running", "data-field": "connection" }, "connected")
    : el("span", { class: "pill failed", "data-field": "connection" }, "down");
  const head = el("header", { class: "host-head" }, el("h2", {}, host.host), badge, meta,
    el("div", { class: "counts" }, ["running", "starting", "stopping", "stopped", "failed", "done"]
      .filter((k) => counts[k]).map((k) => el("span", { class: "pill " + k, title: LABEL[k] }, counts[k] + " " + LABEL[k]))));
  const table = host.services.length
    ? el("table", {}, el("thead", {}, el("tr", {}, ["state", "service", "pid", "since", "respawns", "last exit", ""]
      .map((h) => el("th", {}, h)))), el("tbody", {}, serviceRows(host)))
    : el("p", { class: "empty" }, host.connected ? "No services." : "Waiting for the supervisor…");
  return el("section", { class: "host", id: "host-" + host.host, "data-host": host.host, "data-connected": host.connected },
    head,
    host.error ? el("p", { class: "error", "data-field": "error" }, host.error + (host["down-since"] ? " (down for " + ago(host["down-since"]) + ")" : "")) : null,
    el("div", { class: "body" },
      el("div", { class: "panel" }, el("h3", {}, "Services"), table),
      el("div", { class: "panel" }, el("h3", {}, "Dependencies"), el("div", { class: "graph-wrap" }, graph(host)))));
}

function renderHost(label) {
  const host = page.hosts.get(label);
  const main = document.getElementById("hosts");
  const fresh = hostSection(host);
  const old = [...main.children].find((c) => c.dataset.host === label);
  if (old) {
    const before = new Map([...old.querySelectorAll("tr.svc")].map((r) => [r.dataset.service, r.dataset.state + "/" + r.dataset.pid]));
    for (const r of fresh.querySelectorAll("tr.svc")) {
      const was = before.get(r.dataset.service);
      if (was !== undefined && was !== r.dataset.state + "/" + r.dataset.pid) r.classList.add("flash");
    }
    old.replaceWith(fresh);
  } else main.append(fresh);
}

function renderAuth() {
  const box = document.getElementById("auth");
  box.replaceChildren();
  document.getElementById("mode").textContent = page.writes ? (page.csrf ? "write actions on" : "log in for write actions") : "read-only";
  if (!page.writes) return;
  if (page.csrf) {
    box.append(el("button", { onclick: async () => {
      await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": page.csrf } }); location.reload(); } }, "Log out"));
  } else {
    box.append(el("form", { method: "post", action: "/login" },
      el("input", { type: "password", name: "token", placeholder: "operator token", autocomplete: "current-password", required: true }),
      el("button", { type: "submit" }, "Log in")));
  }
}

let toastTimer = null;
function toast(text, bad) {
  const t = document.getElementById("toast");
  t.textContent = text; t.className = "toast" + (bad ? " bad" : ""); t.hidden = false;
  clearTimeout(toastTimer); toastTimer = setTimeout(() => { t.hidden = true; }, 5000);
}

async function act(host, action, service) {
  toast(action + " " + service + "…");
  try {
    const r = await fetch("/api/action", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": page.csrf },
      body: JSON.stringify({ host, action, service }) });
    const body = await r.json();
    if (!r.ok) toast(body.error || r.statusText, true);
    else if (!body.ok) toast((body.error || {}).message || "failed", true);
    else toast(((body.messages || []).join(" ")) || (action + " " + service + ": done"));
  } catch (e) { toast(String(e), true); }
}

function setLive(state, text) {
  const live = document.getElementById("live");
  live.dataset.live = state;
  document.getElementById("live-text").textContent = text;
}

function applyHost(snapshot) {
  if (!page.hosts.has(snapshot.host)) page.order.push(snapshot.host);
  page.hosts.set(snapshot.host, snapshot);
  renderHost(snapshot.host);
}

function applyLog({ host, line }) {
  const h = page.hosts.get(host);
  if (!h) return;
  const logs = (h.logs = h.logs || {});
  const list = (logs[line.service] = logs[line.service] || []);
  list.push(line);
  if (list.length > MAX_LOG) list.splice(0, list.length - MAX_LOG);
  const section = [...document.getElementById("hosts").children].find((c) => c.dataset.host === host);
  const row = section && [...section.querySelectorAll("tr.log-row")].find((r) => r.dataset.logFor === line.service);
  if (row) {
    const pre = row.querySelector("pre.log");
    [...pre.children].filter((c) => c.tagName === "SPAN").forEach((c) => c.remove());
    pre.append(logLine(line));
    while (pre.children.length > MAX_LOG) pre.firstChild.remove();
    pre.scrollTop = pre.scrollHeight;
  }
}

async function start() {
  const r = await fetch("/api/state", { credentials: "same-origin" });
  const state = await r.json();
  page.writes = state.writes; page.csrf = state.csrf; page.actions = state.actions || [];
  renderAuth();
  for (const h of state.hosts) applyHost(h);
  const es = new EventSource("/events");
  es.addEventListener("open", () => setLive("live", "live"));
  es.addEventListener("error", () => setLive("reconnecting", "reconnecting…"));
  es.addEventListener("host", (e) => applyHost(JSON.parse(e.data)));
  es.addEventListener("log", (e) => applyLog(JSON.parse(e.data)));
  setInterval(() => {
    for (const n of document.querySelectorAll("[data-since]")) n.textContent = ago(Number(n.dataset.since) || undefined);
  }, 1000);
}

start().catch((e) => setLive("reconnecting", "cannot load: " + e));
