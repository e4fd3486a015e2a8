// Protocol v1 bookkeeping for the page, sans-I/O: frames and messages in, decisions out.
// No sockets, no timers, no DOM; app.js does the I/O. Mirrors tickwire.clients.session.

export const PROTOCOL = 1;
// Types: quotes, trades and bars.<N><unit> (the server also checks the bounds, 100ms..1d, and
// that the interval is in its largest unit: docs/protocol.md, Channels).
export const CHANNEL_RE =
  /^(quotes|trades|bars\.[1-9][0-9]{0,8}(?:ms|s|m|h|d)):(\*|[A-Z0-9](?:[A-Z0-9._/-]{0,30}[A-Z0-9])?)$/;

const UNIT_MS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Milliseconds in a bar interval (`250ms`, `5s`, `15m`); NaN if it is not one. */
export function intervalMs(interval) {
  const m = /^([1-9][0-9]*)(ms|s|m|h|d)$/.exec(interval);
  return m ? Number(m[1]) * UNIT_MS[m[2]] : NaN;
}

/** A server frame holds one message object or an array of them. */
export function parseFrame(text) {
  const doc = JSON.parse(text);
  return Array.isArray(doc) ? doc : [doc];
}

/** Does subscription `pattern` (`trades:BTC-USD` or `trades:*`) include channel `ch`? */
export function patternCovers(pattern, ch) {
  if (pattern === ch) return true;
  const [kind, sym] = pattern.split(":");
  return sym === "*" && ch.startsWith(`${kind}:`);
}

/** Exponential backoff with equal jitter: half the step fixed, half random. */
export function backoffDelay(attempt, { baseMs = 250, capMs = 8000 } = {}, random = Math.random) {
  const step = Math.min(capMs, baseMs * 2 ** Math.max(0, attempt));
  return step / 2 + (random() * step) / 2;
}

/** The last `size` latency samples (ms) and their percentiles. */
export class LatencyWindow {
  constructor(size = 1000) {
    this.size = size;
    this.samples = [];
    this.next = 0;
  }

  add(ms) {
    if (this.samples.length < this.size) this.samples.push(ms);
    else this.samples[this.next] = ms;
    this.next = (this.next + 1) % this.size;
  }

  /** {n, p50, p99} (nearest-rank), or null with no samples. */
  percentiles() {
    const n = this.samples.length;
    if (n === 0) return null;
    const sorted = Float64Array.from(this.samples).sort();
    const rank = (p) => sorted[Math.min(n - 1, Math.ceil((p / 100) * n) - 1)];
    return { n, p50: rank(50), p99: rank(99) };
  }
}

/**
 * Per channel: the (epoch, seq) delivered so far. Drops duplicates, notices gaps, resets and
 * holes nobody announced, and builds the `resume` map for the next connection.
 *
 * A hole nobody announced stalls the channel on this connection (`stalled`): the page should
 * reconnect so that the resume fills it. After `maxResumeAttempts` tries for the same channel the
 * hole is accepted with an `unrecovered` notice.
 */
export class ChannelTracker {
  constructor({ maxResumeAttempts = 3 } = {}) {
    this.maxResumeAttempts = maxResumeAttempts;
    // ch -> {epoch, seq, first (seq of the epoch's first delivered event), delivered, duplicates,
    //        gapped, holes}
    this.channels = new Map();
    this.loose = new Set(); // next event may start anywhere (after a reset, or a gap of unknown epoch)
    this.stalled = new Set(); // holes on this connection: drop events until the resume
    this.attempts = new Map(); // ch -> consecutive resumes that did not fill its hole
    this.totals = { delivered: 0, duplicates: 0, gaps: 0, resets: 0, holes: 0, skipped: 0 };
  }

  _channel(ch) {
    let c = this.channels.get(ch);
    if (!c) {
      c = {
        epoch: null, seq: null, first: null, delivered: 0, duplicates: 0, gapped: 0, holes: 0,
        skipped: 0,
      };
      this.channels.set(ch, c);
    }
    return c;
  }

  /** An `events` message → {fresh: events to show, notices: [{level, text}], stall: bool}. */
  events(msg) {
    const { ch, epoch } = msg;
    const notices = [];
    const fresh = [];
    if (this.stalled.has(ch)) return { fresh, notices, stall: false };
    const c = this._channel(ch);
    if (msg.conflated) notices.push({ level: "info", text: `${ch}: conflated to the latest` });
    // A throttled subscription (max_hz): the `skipped` seqs just before the first event were
    // superseded by it. They are accounted for, not a hole; a larger hole still is one.
    const skipped = Number.isInteger(msg.skipped) && msg.skipped > 0 ? msg.skipped : 0;
    const head = msg.events[0];
    if (
      skipped && head && c.epoch === epoch && c.seq !== null && !this.loose.has(ch) &&
      head.seq > c.seq + 1 && head.seq - 1 - skipped <= c.seq
    ) {
      c.skipped += head.seq - 1 - c.seq;
      this.totals.skipped += head.seq - 1 - c.seq;
      c.seq = head.seq - 1;
    }
    for (const ev of msg.events) {
      if (ev.v !== 1) {
        notices.push({ level: "warn", text: `${ch}: skipped an event of unknown schema v=${ev.v}` });
        continue;
      }
      if (c.epoch !== null && c.epoch !== epoch && !this.loose.has(ch)) {
        notices.push({ level: "warn", text: `${ch}: epoch ${c.epoch} → ${epoch} without a reset` });
        this.totals.resets += 1;
        this.loose.add(ch);
      }
      if (c.epoch === epoch && c.seq !== null && !this.loose.has(ch)) {
        if (ev.seq <= c.seq) {
          c.duplicates += 1;
          this.totals.duplicates += 1;
          continue;
        }
        if (ev.seq > c.seq + 1) {
          const tries = this.attempts.get(ch) ?? 0;
          const hole = `${c.seq + 1}..${ev.seq - 1}`;
          if (tries < this.maxResumeAttempts) {
            this.attempts.set(ch, tries + 1);
            this.stalled.add(ch);
            notices.push({ level: "warn", text: `${ch}: unannounced hole ${hole}; resuming` });
            return { fresh, notices, stall: true };
          }
          c.holes += 1;
          this.totals.holes += 1;
          this.attempts.delete(ch);
          notices.push({ level: "warn", text: `${ch}: seqs ${hole} unrecovered` });
        } else {
          this.attempts.delete(ch);
        }
      }
      this.loose.delete(ch);
      if (c.epoch !== epoch || c.first === null) c.first = ev.seq;
      c.epoch = epoch;
      c.seq = ev.seq;
      c.delivered += 1;
      this.totals.delivered += 1;
      fresh.push(ev);
    }
    return { fresh, notices, stall: false };
  }

  /**
   * A `subscribed` ack: where the server started each channel it placed. A channel with nothing
   * delivered yet resumes from there if the connection drops before its first event (epoch "":
   * nothing was stored; its first events may then start anywhere).
   */
  placed(msg) {
    for (const [ch, pos] of Object.entries(msg.positions ?? {})) {
      const c = this._channel(ch);
      if (c.epoch !== null || c.seq !== null) continue;
      c.epoch = pos.epoch;
      c.seq = pos.seq;
      if (pos.epoch === "") this.loose.add(ch);
    }
  }

  /** A `gap` message → a notice; the channel's position moves past the gap. */
  gap(msg) {
    const { ch, from_seq: from, to_seq: to, reason } = msg;
    const c = this._channel(ch);
    const n = to - from + 1;
    this.totals.gaps += 1;
    c.gapped += n;
    if (c.seq === null || to > c.seq) c.seq = to;
    if (c.epoch === null) this.loose.add(ch);
    const level = reason === "conflated" ? "info" : "warn";
    return { level, text: `${ch}: gap ${from}..${to} (${n} event${n === 1 ? "" : "s"}, ${reason})` };
  }

  /** A `reset` message → a notice; the channel's seq starts again in the new epoch. */
  reset(msg) {
    const c = this._channel(msg.ch);
    const old = c.epoch;
    c.epoch = msg.epoch;
    c.seq = null;
    c.first = null;
    this.loose.add(msg.ch);
    this.totals.resets += 1;
    return { level: "warn", text: `${msg.ch}: reset, epoch ${old ?? "?"} → ${msg.epoch}` };
  }

  /** A `heartbeat`: channels the server says it sent further than we have (events lost). */
  behind(msg) {
    const out = [];
    for (const [ch, last] of Object.entries(msg.last ?? {})) {
      const c = this.channels.get(ch);
      if (c && c.seq !== null && !this.loose.has(ch) && last > c.seq && !this.stalled.has(ch)) {
        this.stalled.add(ch);
        out.push(ch);
      }
    }
    return out;
  }

  /** A new connection: nothing is stalled on it yet. */
  connectionMade() {
    this.stalled.clear();
  }

  /** Forget channels that `keep(ch)` says are no longer subscribed. */
  forgetUnless(keep) {
    for (const ch of [...this.channels.keys()]) {
      if (!keep(ch)) {
        this.channels.delete(ch);
        this.loose.delete(ch);
        this.stalled.delete(ch);
        this.attempts.delete(ch);
      }
    }
  }

  /** The `resume` map for a subscribe request: every channel with a known position. */
  resume(covered = () => true) {
    const out = {};
    for (const [ch, c] of this.channels) {
      if (c.epoch !== null && c.seq !== null && covered(ch)) out[ch] = { epoch: c.epoch, seq: c.seq };
    }
    return out;
  }
}

/**
 * The subscribe requests that restore `patterns` on a new connection, resuming every channel
 * with a position. A pattern gets a snapshot only if none of its channels was delivered yet (a
 * snapshot of a channel being resumed would arrive out of order). Requests are split so that
 * none exceeds `maxBytes`.
 */
export function resubscribeRequests(patterns, tracker, nextId, maxBytes = 16384, maxHz = null) {
  // A throttled page asks every request for its rate (`max_hz`), resumes included.
  const rate = maxHz ? { max_hz: maxHz } : {};
  const resume = tracker.resume((ch) => patterns.some((p) => patternCovers(p, ch)));
  const resumed = Object.keys(resume);
  const fresh = patterns.filter((p) => !resumed.some((ch) => patternCovers(p, ch)));
  const plain = patterns.filter((p) => !fresh.includes(p));
  const requests = [];
  if (fresh.length) {
    requests.push({ op: "subscribe", id: nextId(), channels: fresh, snapshot: true, ...rate });
  }
  if (plain.length) {
    let req = { op: "subscribe", id: nextId(), channels: plain, resume: {}, ...rate };
    for (const ch of resumed) {
      req.resume[ch] = resume[ch];
      if (JSON.stringify(req).length > maxBytes - 64 && Object.keys(req.resume).length > 1) {
        delete req.resume[ch];
        requests.push(req);
        // Further pages name one covering pattern again: already subscribed, so only resumed.
        const cover = plain.find((p) => patternCovers(p, ch));
        req = {
          op: "subscribe", id: nextId(), channels: [cover], resume: { [ch]: resume[ch] }, ...rate,
        };
      }
    }
    requests.push(req);
  }
  return requests;
}
