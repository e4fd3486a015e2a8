// The tickwire live page: one WebSocket to /ws, a table of symbols, sparklines, latency, a log.
// Protocol decisions live in protocol.js; this file does the I/O and the drawing.
import { CandleChart } from "./chart.js";
import {
  CHANNEL_RE,
  ChannelTracker,
  LatencyWindow,
  PROTOCOL,
  backoffDelay,
  intervalMs,
  parseFrame,
  patternCovers,
  resubscribeRequests,
} from "./protocol.js";

const DEFAULT_CHANNELS = ["quotes:*", "trades:*"];
const SPARK_EVERY_MS = 250; // the table is redrawn, and each sparkline sampled, this often…
const SPARK_POINTS = 240; // …for the last minute
const LOG_LINES = 200;

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const wsUrl = (() => {
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (params.get("token")) url.searchParams.set("token", params.get("token"));
  return url.href;
})();

const feed = {
  ws: null,
  state: "connecting",
  connects: 0,
  attempt: 0,
  stopped: false,
  ids: 1,
  pending: new Map(), // request id -> request
  wanted: (params.get("channels")?.split(",").filter(Boolean) ?? DEFAULT_CHANNELS).slice(),
  subscribed: [], // what the server last said we are subscribed to
  // Updates per second per channel asked of the server (`max_hz`), or null for every update.
  maxHz: Number(params.get("max_hz")) > 0 ? Number(params.get("max_hz")) : null,
  known: new Set(), // concrete channels the server told us of
  heartbeatMs: 5000,
  maxMessageBytes: 16384,
  lastFrameAt: 0,
  liveSince: Infinity, // publish times (ms) before this are history (snapshot/resume), not latency
  redis: "up",
  tracker: new ChannelTracker(),
  latency: new LatencyWindow(1000),
  received: 0,
};
const rows = new Map(); // symbol -> row state

const now = () => performance.timeOrigin + performance.now();
const nextId = () => feed.ids++;

// --- connection ---------------------------------------------------------------------------------

function connect() {
  feed.connects += 1;
  setState("connecting");
  const ws = new WebSocket(wsUrl);
  feed.ws = ws;
  ws.onmessage = (e) => {
    if (ws !== feed.ws) return;
    feed.lastFrameAt = now();
    let messages;
    try {
      messages = parseFrame(e.data);
    } catch (err) {
      log("error", `unreadable frame: ${err.message}`);
      return;
    }
    for (const msg of messages) handle(msg);
  };
  ws.onclose = (e) => {
    if (ws !== feed.ws) return;
    feed.ws = null;
    feed.pending.clear();
    const why = e.code === 1006 ? "connection lost" : `closed ${e.code} ${e.reason}`.trim();
    if (feed.state === "live") log("warn", `disconnected: ${why}`);
    if (!feed.stopped) scheduleReconnect();
  };
}

function scheduleReconnect() {
  const delay = backoffDelay(feed.attempt);
  feed.attempt += 1;
  setState("reconnecting", `in ${(delay / 1000).toFixed(1)} s (attempt ${feed.attempt})`);
  setTimeout(connect, delay);
}

function send(req) {
  if (!feed.ws || feed.ws.readyState !== WebSocket.OPEN) return false;
  if (req.id !== undefined) feed.pending.set(req.id, req);
  feed.ws.send(JSON.stringify(req));
  return true;
}

function reconnectToResume(reason) {
  const ws = feed.ws;
  if (!ws) return;
  log("warn", `${reason}: reconnecting to resume`);
  // Let go of the socket now: a dead connection may never finish its closing handshake, and
  // whatever it still delivers is ignored (handlers check ws === feed.ws).
  feed.ws = null;
  feed.pending.clear();
  ws.close(4000, "resume");
  scheduleReconnect();
}

// Browsers do not always notice a dead TCP connection; the server speaks at least every
// heartbeat_ms, so a long silence means the connection is gone.
setInterval(() => {
  const ws = feed.ws;
  if (ws && feed.state === "live" && now() - feed.lastFrameAt > Math.max(3 * feed.heartbeatMs, 10000)) {
    reconnectToResume("no frame for too long");
  }
}, 1000);

// --- messages -----------------------------------------------------------------------------------

function handle(msg) {
  switch (msg.type) {
    case "welcome":
      return onWelcome(msg);
    case "events":
      return onEvents(msg);
    case "gap":
      return log(...notice(feed.tracker.gap(msg)));
    case "reset":
      return log(...notice(feed.tracker.reset(msg)));
    case "heartbeat": {
      const behind = feed.tracker.behind(msg);
      if (behind.length) reconnectToResume(`heartbeat says events were missed on ${behind.join(", ")}`);
      return undefined;
    }
    case "subscribed":
      feed.tracker.placed(msg);
    // falls through
    case "unsubscribed":
      feed.pending.delete(msg.id);
      feed.subscribed = msg.channels;
      return renderChips();
    case "channels":
      feed.pending.delete(msg.id);
      for (const ch of msg.channels) feed.known.add(ch);
      return renderKnown();
    case "pong":
      return feed.pending.delete(msg.id);
    case "status":
      feed.redis = msg.redis;
      log(msg.redis === "down" ? "warn" : "info", `server ${msg.redis === "down" ? "lost" : "regained"} Redis`);
      return setState(feed.state);
    case "error":
      return onError(msg);
    default:
      return undefined; // a message type added later within v1: ignore it
  }
}

function onWelcome(msg) {
  if (msg.protocol !== PROTOCOL) {
    log("error", `server speaks protocol ${msg.protocol}, this page ${PROTOCOL}: not connecting`);
    feed.stopped = true;
    feed.ws.close(1000, "unsupported protocol");
    return setState("unsupported");
  }
  feed.attempt = 0;
  feed.heartbeatMs = msg.heartbeat_ms ?? 5000;
  feed.maxMessageBytes = msg.limits?.max_message_bytes ?? 16384;
  feed.liveSince = now();
  feed.tracker.connectionMade();
  setState("live", msg.server);
  log("info", `connected to ${msg.server}${feed.connects > 1 ? ", resuming" : ""}`);
  send({ op: "list", id: nextId() });
  resubscribe();
  return undefined;
}

function resubscribe() {
  const requests = resubscribeRequests(
    feed.wanted, feed.tracker, nextId, feed.maxMessageBytes, feed.maxHz,
  );
  for (const req of requests) send(req);
}

function onError(msg) {
  const req = feed.pending.get(msg.id);
  feed.pending.delete(msg.id);
  log("error", `${req ? `${req.op} failed` : "error"}: ${msg.code}: ${msg.message}`);
  if (req?.op === "subscribe" && !["rate_limited", "internal"].includes(msg.code)) {
    // A name the server refuses stays refused: stop asking for it on every reconnect.
    const resumed = Object.keys(req.resume ?? {}).length > 0;
    if (!resumed) feed.wanted = feed.wanted.filter((p) => !req.channels.includes(p));
    renderChips();
  }
}

function onEvents(msg) {
  const { fresh, notices, stall } = feed.tracker.events(msg);
  for (const n of notices) log(...notice(n));
  if (!feed.known.has(msg.ch)) {
    feed.known.add(msg.ch);
    renderKnown();
  }
  const t = now();
  for (const ev of fresh) {
    feed.received += 1;
    const ptMs = ev.pt / 1e6; // ns above 2^53: ~256 ns precision, plenty for ms
    if (ptMs >= feed.liveSince) feed.latency.add(t - ptMs);
    apply(ev);
  }
  if (stall) reconnectToResume(`${msg.ch}: events missing`);
}

// --- the table ----------------------------------------------------------------------------------

function row(sym) {
  let r = rows.get(sym);
  if (r) return r;
  const tr = document.createElement("tr");
  tr.dataset.sym = sym;
  tr.innerHTML =
    '<th scope="row" class="sym"></th><td class="bid num"></td><td class="ask num"></td>' +
    '<td class="last num"></td><td class="size num"></td><td class="side"></td>' +
    '<td class="chg num"></td><td class="rate num"></td><td class="chart"><canvas></canvas></td>';
  const th = tr.querySelector(".sym");
  th.textContent = sym;
  th.title = "click for a chart of its bars";
  th.addEventListener("click", () => openChart(sym, chartState.interval));
  r = {
    sym,
    tr,
    cells: Object.fromEntries(
      ["bid", "ask", "last", "size", "side", "chg", "rate"].map((k) => [k, tr.querySelector(`.${k}`)]),
    ),
    canvas: tr.querySelector("canvas"),
    quote: null,
    trade: null,
    bar: null,
    first: null,
    points: [],
    count: 0,
    counted: 0,
    dirty: true,
  };
  rows.set(sym, r);
  const body = $("#quotes tbody");
  const after = [...body.children].find((other) => other.dataset.sym > sym);
  body.insertBefore(tr, after ?? null);
  $("#empty").hidden = true;
  return r;
}

function price(r) {
  if (r.trade) return r.trade.price;
  if (r.quote) return (r.quote.bid + r.quote.ask) / 2;
  if (r.bar) return r.bar.close;
  return null;
}

// With several bar intervals subscribed, the row shows the shortest, the freshest close,
// instead of whichever bar came last.
const span = (interval) => intervalMs(interval);

function apply(ev) {
  const r = row(ev.sym);
  if (ev.type === "quote") r.quote = ev;
  else if (ev.type === "trade") r.trade = ev;
  else if (ev.type === "bar") {
    if (!r.bar || span(ev.interval) <= span(r.bar.interval)) r.bar = ev;
    if (ev.sym === chartState.sym && ev.interval === chartState.interval) chart.update(ev);
  }
  r.first ??= price(r);
  r.count += 1;
  r.dirty = true;
}

function dropUncovered() {
  const covered = (ch) => feed.wanted.some((p) => patternCovers(p, ch));
  feed.tracker.forgetUnless(covered);
  for (const r of rows.values()) {
    if (r.quote && !covered(`quotes:${r.sym}`)) r.quote = null;
    if (r.trade && !covered(`trades:${r.sym}`)) r.trade = null;
    if (r.bar && !covered(`bars.${r.bar.interval}:${r.sym}`)) r.bar = null;
    if (!r.quote && !r.trade && !r.bar) {
      r.tr.remove();
      rows.delete(r.sym);
    } else r.dirty = true;
  }
  $("#empty").hidden = rows.size > 0;
}

const fmt = (x) => (x === null || x === undefined ? "" : String(x));

function renderRow(r) {
  const c = r.cells;
  c.bid.textContent = fmt(r.quote?.bid);
  c.ask.textContent = fmt(r.quote?.ask);
  c.last.textContent = fmt(r.trade?.price ?? r.bar?.close);
  c.size.textContent = fmt(r.trade?.size ?? r.bar?.volume);
  c.side.textContent = r.trade?.side ?? "";
  c.side.className = `side ${r.trade?.side ?? ""}`;
  const p = price(r);
  if (p !== null && r.first) {
    const pct = Number((((p - r.first) / r.first) * 100).toFixed(2)) || 0; // no "-0.00"
    c.chg.textContent = `${pct > 0 ? "+" : ""}${pct.toFixed(2)}%`;
    c.chg.className = `chg num ${pct > 0 ? "up" : pct < 0 ? "down" : ""}`;
  }
  r.dirty = false;
}

function drawSpark(r) {
  const canvas = r.canvas;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  if (canvas.width !== w * dpr) {
    canvas.width = w * dpr;
    canvas.height = h * dpr;
  }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const pts = r.points;
  if (pts.length < 2) return;
  let lo = Math.min(...pts);
  let hi = Math.max(...pts);
  if (hi === lo) {
    hi += 1;
    lo -= 1;
  }
  g.beginPath();
  pts.forEach((v, i) => {
    const x = (i / (pts.length - 1)) * w; // fills the width until a minute has passed
    const y = h - 2 - ((v - lo) / (hi - lo)) * (h - 4);
    if (i === 0) g.moveTo(x, y);
    else g.lineTo(x, y);
  });
  g.lineWidth = 1.25;
  g.strokeStyle = pts.at(-1) >= pts[0] ? "#3fb950" : "#f85149";
  g.stroke();
}

// --- header, chips, log --------------------------------------------------------------------------

function setState(state, detail = "") {
  feed.state = state;
  const el = $("#state");
  el.dataset.state = state;
  el.textContent = state === "live" && feed.redis === "down" ? "live · Redis down" : state;
  el.title = detail;
  $("#state-detail").textContent = detail;
}

function renderChips() {
  const box = $("#subs");
  box.replaceChildren(
    ...feed.wanted.map((p) => {
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.dataset.channel = p;
      chip.dataset.confirmed = String(feed.subscribed.includes(p));
      chip.textContent = p;
      const x = document.createElement("button");
      x.type = "button";
      x.textContent = "×";
      x.title = `unsubscribe ${p}`;
      x.onclick = () => unsubscribe(p);
      chip.append(x);
      return chip;
    }),
  );
}

function renderKnown() {
  const kinds = new Set([...feed.known].map((ch) => ch.split(":")[0]));
  const options = [...[...kinds].map((k) => `${k}:*`), ...[...feed.known].sort()];
  $("#known").replaceChildren(
    ...options.map((v) => Object.assign(document.createElement("option"), { value: v })),
  );
  $("#known-count").textContent = `${feed.known.size} channels known`;
}

function log(level, text) {
  const li = document.createElement("li");
  li.className = level;
  const time = new Date().toLocaleTimeString([], { hour12: false });
  li.textContent = `${time} ${text}`;
  const list = $("#log");
  list.prepend(li);
  while (list.children.length > LOG_LINES) list.lastChild.remove();
}

const notice = (n) => [n.level, n.text];

function subscribe(pattern) {
  if (!CHANNEL_RE.test(pattern)) {
    log("error", `not a channel: ${pattern} (e.g. quotes:AAPL, trades:*)`);
    return;
  }
  if (feed.wanted.includes(pattern)) return;
  feed.wanted.push(pattern);
  renderChips();
  const rate = feed.maxHz ? { max_hz: feed.maxHz } : {};
  send({ op: "subscribe", id: nextId(), channels: [pattern], snapshot: true, ...rate });
}

// The rate selector: a subscription keeps its rate until unsubscribed, so every pattern is
// unsubscribed and subscribed again at the new rate, resuming where the page stands.
function setMaxHz(value) {
  feed.maxHz = Number(value) > 0 ? Number(value) : null;
  log("info", feed.maxHz ? `at most ${feed.maxHz} updates/s per channel` : "every update");
  if (feed.state !== "live" || !feed.wanted.length) return;
  send({ op: "unsubscribe", id: nextId(), channels: feed.wanted.slice() });
  resubscribe();
}

const rateSelect = $("#max-hz");
rateSelect.value = String(feed.maxHz ?? 0);
if (rateSelect.value === "") {
  // A rate from the query string that the list does not offer: show it as an option.
  rateSelect.add(new Option(`${feed.maxHz}/s`, String(feed.maxHz)));
  rateSelect.value = String(feed.maxHz);
}
rateSelect.addEventListener("change", () => setMaxHz(rateSelect.value));

function unsubscribe(pattern) {
  feed.wanted = feed.wanted.filter((p) => p !== pattern);
  renderChips();
  send({ op: "unsubscribe", id: nextId(), channels: [pattern] });
  dropUncovered();
}

$("#add").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("#channel");
  subscribe(input.value.trim());
  input.value = "";
});

// --- render loop --------------------------------------------------------------------------------

let lastRate = now();
let lastReceived = 0;

function render() {
  for (const r of rows.values()) if (r.dirty) renderRow(r);
  const t = now();
  const p = feed.latency.percentiles();
  $("#lat-p50").textContent = p ? p.p50.toFixed(1) : "–";
  $("#lat-p99").textContent = p ? p.p99.toFixed(1) : "–";
  $("#lat-n").textContent = p ? String(p.n) : "0";
  if (t - lastRate >= 990) {
    const secs = (t - lastRate) / 1000;
    $("#rate").textContent = ((feed.received - lastReceived) / secs).toFixed(0);
    for (const r of rows.values()) {
      r.cells.rate.textContent = ((r.count - r.counted) / secs).toFixed(0);
      r.counted = r.count;
    }
    lastReceived = feed.received;
    lastRate = t;
  }
  for (const r of rows.values()) {
    const v = price(r);
    if (v === null) continue;
    r.points.push(v);
    if (r.points.length > SPARK_POINTS) r.points.shift();
    drawSpark(r);
  }
}

setInterval(render, SPARK_EVERY_MS);

// --- the chart ----------------------------------------------------------------------------------

const chart = new CandleChart($("#chart"));
// The symbol and interval shown, and the channel the chart subscribed itself (null when the
// user had subscribed it already: closing the chart then leaves it).
const chartState = { sym: null, interval: "1s", own: null };

function openChart(sym, interval) {
  closeChart();
  const channel = `bars.${interval}:${sym}`;
  Object.assign(chartState, { sym, interval, own: null });
  $("#chart-panel").hidden = false;
  $("#chart-title").textContent = `${sym} bars`;
  $("#chart-interval").value = interval;
  chart.clear();
  if (!feed.wanted.some((p) => patternCovers(p, channel))) {
    chartState.own = channel;
    subscribe(channel);
  }
  const bar = rows.get(sym)?.bar;
  if (bar && bar.interval === interval) chart.update(bar);
  chart.draw();
}

function closeChart() {
  if (chartState.own) unsubscribe(chartState.own);
  Object.assign(chartState, { sym: null, own: null });
  $("#chart-panel").hidden = true;
}

$("#chart-interval").addEventListener("change", (e) => {
  if (chartState.sym) openChart(chartState.sym, e.target.value);
  else chartState.interval = e.target.value;
});
$("#chart-close").addEventListener("click", closeChart);
setInterval(() => chart.draw(), SPARK_EVERY_MS);

// Read-only view for tests and the curious (window.tickwire.snapshot() in the console).
window.tickwire = {
  chart: () => ({
    channel: chartState.sym ? `bars.${chartState.interval}:${chartState.sym}` : null,
    ...chart.summary(),
  }),
  snapshot: () => ({
    state: feed.state,
    connects: feed.connects,
    wanted: [...feed.wanted],
    subscribed: [...feed.subscribed],
    received: feed.received,
    totals: { ...feed.tracker.totals },
    positions: Object.fromEntries(
      [...feed.tracker.channels].map(([ch, c]) => [ch, { ...c }]),
    ),
  }),
};

renderChips();
connect();
