// Weir's status page: renders GET /v1/status every 5 s. Built with DOM calls and
// textContent only: names and log lines come from devices and plugins, never HTML.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "weir-admin-token";
const charts = {};

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let v = Number(n) || 0;
  let u = 0;
  while (v >= 1000 && u < units.length - 1) { v /= 1000; u += 1; }
  return u === 0 ? v.toFixed(0) + " B" : v.toFixed(1) + " " + units[u];
}

function rate(n) {
  const v = Number(n) || 0;
  return v >= 100 ? v.toFixed(0) : v.toFixed(1);
}

function duration(secs) {
  const s = Math.max(0, Math.floor(secs));
  if (s < 120) return s + " s";
  if (s < 7200) return Math.floor(s / 60) + " min";
  if (s < 172800) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " days";
}

function ago(ms, now) {
  return ms ? duration((now - ms) / 1000) + " ago" : "never";
}

function words(s) {
  return String(s).replace(/_/g, " ");
}

function fillTable(id, rows, empty) {
  const body = document.querySelector("#" + id + " tbody");
  const fresh = document.createElement("tbody");
  for (const cells of rows) {
    const tr = el("tr");
    for (const c of cells) {
      const td = el("td", c.text, c.cls);
      if (c.data) td.dataset.name = c.data;
      tr.appendChild(td);
    }
    fresh.appendChild(tr);
  }
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", empty, "muted");
    td.colSpan = document.querySelectorAll("#" + id + " thead th").length;
    tr.appendChild(td);
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function fillFigures(id, pairs) {
  const dl = document.getElementById(id);
  dl.replaceChildren();
  for (const [name, value, key] of pairs) {
    dl.appendChild(el("dt", name));
    const dd = el("dd", value);
    dd.dataset.name = key;
    dl.appendChild(dd);
  }
}

function chart(id, series, data, format) {
  const box = document.getElementById(id);
  // The card's inner width (its padding is 12 px a side).
  const width = Math.max(200, box.parentElement.clientWidth - 24);
  if (!charts[id]) {
    charts[id] = new uPlot({
      width: width,
      height: 200,
      series: [{}].concat(series.map((s) => ({ label: s.label, stroke: s.color, width: 2 }))),
      axes: [{}, { size: 70, values: (u, values) => values.map(format) }],
      // Always the last 15 minutes up to now, however young the history.
      scales: {
        x: {
          time: true,
          range: () => {
            const now = Date.now() / 1000;
            return [now - 900, now];
          },
        },
      },
    }, data, box);
  } else {
    charts[id].setData(data);
    if (charts[id].width !== width) charts[id].setSize({ width: width, height: 200 });
  }
}

function render(s) {
  const now = Date.now();
  document.getElementById("version").textContent = s.version;
  const health = document.getElementById("health");
  health.textContent = s.health;
  health.className = "badge " + s.health;
  document.getElementById("uptime").textContent = "up " + duration(s.uptime_s);
  document.getElementById("updated").textContent = "updated " + new Date(now).toLocaleTimeString();
  const problems = document.getElementById("problems");
  problems.replaceChildren(...s.problems.map((p) => el("li", p)));

  const h = s.history;
  const t = h.map((x) => x.t_ms / 1000);
  chart("chart-messages", [
    { label: "in", color: "#1f6feb" },
    { label: "out", color: "#d4a72c" },
  ], [t, h.map((x) => x.messages_in), h.map((x) => x.messages_out)], rate);
  chart("chart-bytes", [
    { label: "in", color: "#1f6feb" },
    { label: "out", color: "#d4a72c" },
    { label: "written to disk", color: "#b42318" },
  ], [t, h.map((x) => x.bytes_in), h.map((x) => x.bytes_out), h.map((x) => x.disk_bytes_written)], bytes);

  const m = s.mqtt;
  fillFigures("mqtt", [
    ["clients connected", m.connections, "connections"],
    ["sessions", m.sessions, "sessions"],
    ["subscriptions", m.subscriptions, "subscriptions"],
    ["retained messages", m.retained, "retained"],
    ["received", m.received, "received"],
    ["sent", m.sent, "sent"],
    ["dropped", m.dropped, "dropped"],
  ]);
  const st = s.storage;
  fillFigures("storage", [
    ["database", bytes(st.database_bytes), "database"],
    ["journal", bytes(st.journal_bytes), "journal"],
    ["free", st.free_bytes === null ? "?" : bytes(st.free_bytes), "free"],
    ["commits/s", rate(st.commits_per_s), "commits"],
    ["written to disk", bytes(st.disk_bytes_written_per_s) + "/s", "written"],
    ["data directory", st.data_dir, "data_dir"],
  ]);

  fillTable("topics", s.topics.map((x) => [
    { text: x.name, data: x.name },
    { text: x.partitions, cls: "num" },
    { text: x.records, cls: "num", data: "records" },
    { text: bytes(x.bytes), cls: "num" },
    { text: x.retention_ms === null ? "forever" : duration(x.retention_ms / 1000) },
    { text: rate(x.records_per_s), cls: "num" },
  ]), "no topics");
  fillTable("pipelines", s.pipelines.map((p) => [
    { text: p.name, data: p.name },
    { text: words(p.status.state), cls: "state-" + p.status.state },
    { text: p.status.plugin_version === null ? "file" : "v" + p.status.plugin_version },
    { text: p.lag, cls: "num" },
    { text: p.records_out, cls: "num", data: "records_out" },
    { text: p.failed, cls: "num" },
  ]), "no pipelines");
  fillTable("replication", s.replication.map((r) => {
    const lag = r.partitions.reduce((sum, p) => sum + p.lag_records, 0);
    const oldest = r.partitions.map((p) => p.oldest_unsent_ms).filter((t) => typeof t === "number");
    const behind = oldest.length ? ", " + duration((now - Math.min(...oldest)) / 1000) + " behind" : "";
    const since = "since start " + ago(r.errors_since_ms, now);
    const error = r.last_error
      ? r.upstream_errors + " " + since + "; last " + ago(r.last_error_ms, now) +
        (r.last_error_over ? " (over): " : ": ") + r.last_error
      : r.upstream_errors + " " + since;
    return [
      { text: r.name, data: r.name },
      { text: words(r.state), cls: "state-" + r.state },
      { text: r.upstream },
      { text: lag + " records" + behind, cls: "num", data: "lag" },
      { text: ago(r.last_success_ms, now) },
      { text: error, cls: r.last_error && !r.last_error_over ? "wrap error" : "wrap" },
    ];
  }), "no replication rules");
  fillTable("groups", s.groups.map((g) => [
    { text: g.group, data: g.group },
    { text: g.lag, cls: "num" },
  ]), "no consumer groups");
  fillTable("listeners", s.listeners.map((l) => [
    { text: l.name + (l.tls ? " (TLS)" : "") },
    { text: l.address },
    { text: l.auth, cls: "wrap" },
  ]), "");

  const log = document.getElementById("log");
  const lines = s.recent_log.slice().reverse().map((e) =>
    el("li", ago(e.t_ms, now) + " " + e.level + " " + e.target + ": " + e.message, e.level));
  log.replaceChildren(...(lines.length ? lines : [el("li", "none", "muted")]));
  // Whether the page is wider than the window (it should never be: tables scroll).
  document.body.dataset.overflow = String(document.documentElement.scrollWidth > window.innerWidth);
}

async function refresh() {
  const problem = document.getElementById("fetch-error");
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  try {
    const response = await fetch("/v1/status", { headers: headers, cache: "no-store" });
    if (response.status === 401) {
      const given = window.prompt("This broker's admin API needs its token (WEIR_ADMIN_TOKEN):");
      if (given) sessionStorage.setItem(TOKEN_KEY, given);
      throw new Error("the admin API needs its token");
    }
    if (!response.ok) throw new Error("GET /v1/status answered " + response.status);
    render(await response.json());
    problem.hidden = true;
  } catch (e) {
    problem.textContent = "Cannot read the broker's status: " + e.message;
    problem.hidden = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
