// The pg_changerelay dashboard. Served by the endpoint itself (no build step, nothing loaded from elsewhere).
//
// Data: `GET /status` every second (worker state and lag, connections, the labels this token may read,
// running totals from which the rates are derived) and one WebSocket on `/ws` subscribed to the versions of
// those labels (each label's full map, then deltas), from which each label's `all` version is shown as it
// moves. The token is typed in and kept in this browser's session storage (local storage when "remember"
// is ticked); it goes only to this endpoint: as a Bearer header to /status, as `?token=` to /ws (a
// browser's WebSocket cannot set headers).

const POLL_MS = 1000;
const SAMPLES = 120; // two minutes of samples
const STORE_KEY = "changerelay.dashboard.token";
const MAX_BACKOFF_MS = 10000;

const $ = (id) => document.getElementById(id);

const state = {
  token: null, // null: not connected; "" under trust
  running: false,
  pollTimer: null,
  ws: null,
  wsBackoff: 500,
  wsTimer: null,
  labels: new Map(), // label -> {v, ts} of its `all` version (once its map arrived), rows: identifiers seen
  subscribed: new Set(), // labels subscribed on the current WebSocket
  previous: null, // the last /status sample: {at, uptime, totals}
  rates: [], // changes per second, oldest first
  lags: [], // lag bytes, oldest first
};

function storedToken() {
  return sessionStorage.getItem(STORE_KEY) ?? localStorage.getItem(STORE_KEY);
}

function showMessage(text) {
  const m = $("message");
  m.textContent = text ?? "";
  m.hidden = !text;
}

function setLink(text, cls) {
  const p = $("link");
  p.textContent = text;
  p.className = `pill ${cls}`;
}

function formatBytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(n >= 100 ? 0 : 1)} ${units[i]}`;
}

function formatAgo(ms) {
  if (!ms) return "–";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toISOString().slice(0, 16).replace("T", " ");
}

function formatDuration(ms) {
  const s = Math.floor(ms / 1000);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

// --- /status ---------------------------------------------------------------------------------------------

async function poll() {
  if (!state.running) return;
  try {
    const r = await fetch("/status", { headers: authHeaders(), cache: "no-store", signal: AbortSignal.timeout(5000) });
    if (r.status === 401) {
      stop();
      setLink("token refused", "bad");
      showMessage("The endpoint refused this token (401). Type a token from changerelay.create_token().");
      return;
    }
    if (!r.ok) throw new Error(`/status answered ${r.status}`);
    render(await r.json());
    if (state.ws?.readyState === WebSocket.OPEN) setLink("live", "on");
  } catch (e) {
    setLink("endpoint unreachable", "bad");
    state.previous = null;
  } finally {
    if (state.running) state.pollTimer = setTimeout(poll, POLL_MS);
  }
}

function render(s) {
  const w = s.worker;
  const st = $("worker-state");
  st.textContent = w.consuming ? w.state : `${w.state} (not consuming)`;
  st.className = w.consuming ? "state-ok" : "state-bad";
  $("worker-lag").textContent = formatBytes(w.lag_bytes);
  $("worker-event").textContent = String(w.last_event_id);
  $("worker-cursor").textContent = w.cursor ?? "–";
  $("worker-cursor").title = w.cursor ?? "";
  $("uptime").textContent = formatDuration(s.uptime_ms);
  for (const [k, v] of Object.entries(s.clients)) {
    const el = $(`clients-${k}`);
    if (el) el.textContent = String(v);
  }
  const now = performance.now();
  const prev = state.previous;
  // A restarted endpoint starts its totals again: start the rates again too.
  if (prev && s.uptime_ms >= prev.uptime) {
    const secs = Math.max((now - prev.at) / 1000, 0.001);
    const rate = (key) => Math.max(0, (s.totals[key] - prev.totals[key]) / secs);
    push(state.rates, rate("changes"));
    $("rate-changes").textContent = rate("changes").toFixed(1);
    $("rate-messages").textContent = rate("messages_sent").toFixed(1);
    $("rate-bytes").textContent = formatBytes(rate("bytes_sent"));
  }
  push(state.lags, w.lag_bytes);
  state.previous = { at: now, uptime: s.uptime_ms, totals: s.totals };
  const span = `last ${formatDuration(state.rates.length * POLL_MS)}`;
  const maxRate = spark($("throughput"), state.rates);
  $("throughput-caption").textContent = `changes per second, ${span} (peak ${maxRate.toFixed(1)})`;
  const maxLag = spark($("lag-spark"), state.lags);
  $("lag-caption").textContent = `lag, ${span} (peak ${formatBytes(maxLag)})`;
  followLabels(s.labels);
  renderLabels();
}

function push(list, value) {
  list.push(value);
  if (list.length > SAMPLES) list.shift();
}

/** Draws `values` (one per poll, oldest first) across the whole width; returns their maximum. */
function spark(svg, values) {
  const NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const max = Math.max(...values, 0);
  if (values.length < 2) return max;
  const step = 120 / (values.length - 1);
  const top = max || 1;
  const pts = values.map((v, i) => `${(i * step).toFixed(2)},${(29 - (v / top) * 27).toFixed(2)}`);
  const area = document.createElementNS(NS, "polygon");
  area.setAttribute("points", `0,30 ${pts.join(" ")} 120,30`);
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", pts.join(" "));
  svg.append(area, line);
  return max;
}

// --- labels and their versions over /ws --------------------------------------------------------------------

function followLabels(labels) {
  const wanted = new Set(labels);
  for (const l of [...state.labels.keys()]) {
    if (!wanted.has(l)) {
      state.labels.delete(l);
      if (state.subscribed.delete(l)) send({ op: "unsubscribe", labels: [l] });
    }
  }
  for (const l of labels) {
    if (!state.labels.has(l)) state.labels.set(l, { rows: new Set() });
  }
  subscribeAll();
}

function send(cmd) {
  if (state.ws?.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(cmd));
}

function subscribeAll() {
  if (state.ws?.readyState !== WebSocket.OPEN) return;
  for (const l of state.labels.keys()) {
    if (state.subscribed.has(l)) continue;
    state.subscribed.add(l);
    send({ op: "subscribe", labels: [l], versions: true, changes: false });
  }
}

function openSocket() {
  if (!state.running) return;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = state.token ? `?token=${encodeURIComponent(state.token)}` : "";
  const ws = new WebSocket(`${scheme}//${location.host}/ws${query}`);
  state.ws = ws;
  state.subscribed.clear();
  ws.onopen = () => {
    state.wsBackoff = 500;
    setLink("live", "on");
    subscribeAll();
  };
  ws.onmessage = (e) => {
    let m;
    try {
      m = JSON.parse(e.data);
    } catch {
      return;
    }
    if (typeof m.label === "string" && m.data && typeof m.data === "object" && m.type === undefined) {
      onVersions(m.label, m.data);
    } else if (m.type === "error") {
      if (m.label) state.subscribed.delete(m.label);
      showMessage(`${m.label ? `${m.label}: ` : ""}${m.message}`);
    }
  };
  ws.onclose = () => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.subscribed.clear();
    if (!state.running) return;
    setLink("reconnecting", "off");
    state.wsTimer = setTimeout(openSocket, state.wsBackoff);
    state.wsBackoff = Math.min(state.wsBackoff * 2, MAX_BACKOFF_MS);
  };
}

/** A label's version map or delta: its `all` version, and the identifiers it holds. */
function onVersions(label, data) {
  const entry = state.labels.get(label);
  if (!entry) return;
  // Every delta holds `all`; only the map of a label that never changed lacks it.
  const all = data.all ?? (entry.v === undefined ? { v: 0, ts: 0 } : null);
  if (all && (entry.v === undefined || all.v > entry.v)) {
    entry.moved = entry.v !== undefined;
    entry.v = all.v;
    entry.ts = all.ts;
  }
  for (const id of Object.keys(data)) if (id !== "all") entry.rows.add(id);
  renderLabels();
}

function renderLabels() {
  const body = $("labels");
  const rows = new Map([...body.children].map((tr) => [tr.dataset.label, tr]));
  const names = [...state.labels.keys()].sort();
  $("label-count").textContent = `(${names.length})`;
  for (const [name, tr] of rows) if (!state.labels.has(name)) tr.remove();
  let before = null;
  for (const name of names.reverse()) {
    let tr = rows.get(name);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.label = name;
      for (const cls of ["name", "version", "changed", "rows"]) {
        const td = document.createElement("td");
        td.className = cls;
        tr.append(td);
      }
      tr.cells[0].textContent = name;
    }
    body.insertBefore(tr, before);
    before = tr;
    const v = state.labels.get(name);
    const text = v.v === undefined ? "…" : String(v.v);
    if (tr.cells[1].textContent !== text) {
      tr.cells[1].textContent = text;
      if (v.moved) {
        tr.classList.remove("moved");
        void tr.offsetWidth; // restart the highlight
        tr.classList.add("moved");
      }
    }
    tr.cells[2].textContent = formatAgo(v.ts);
    tr.cells[3].textContent = v.v === undefined ? "–" : String(v.rows.size);
  }
}

// --- connecting --------------------------------------------------------------------------------------------

function start(token) {
  stop();
  state.token = token;
  state.running = true;
  state.previous = null;
  state.rates = [];
  state.lags = [];
  showMessage(null);
  setLink("connecting", "off");
  poll();
  openSocket();
}

function stop() {
  state.running = false;
  clearTimeout(state.pollTimer);
  clearTimeout(state.wsTimer);
  const ws = state.ws;
  state.ws = null;
  ws?.close(1000);
  state.labels.clear();
  state.subscribed.clear();
  renderLabels();
  setLink("not connected", "off");
}

function init() {
  $("endpoint").textContent = location.host;
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    sessionStorage.setItem(STORE_KEY, token);
    if ($("remember").checked) localStorage.setItem(STORE_KEY, token);
    else localStorage.removeItem(STORE_KEY);
    start(token);
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(STORE_KEY);
    localStorage.removeItem(STORE_KEY);
    $("token").value = "";
    stop();
  });
  const saved = storedToken();
  if (saved !== null) {
    $("token").value = saved;
    $("remember").checked = localStorage.getItem(STORE_KEY) !== null;
    start(saved);
  }
}

init();
