// A candlestick chart with volume on a <canvas>: the bars of one channel, live.
//
// A small renderer of our own rather than a charting library: the page has no build step and
// no dependencies, a chart of a few hundred candles is ~100 lines of canvas calls, and the
// page's tests drive it without any library's internals in the way.

/** Bars kept per chart: enough to fill a wide canvas at 4 px a candle. */
const MAX_BARS = 240;

export class CandleChart {
  /** @param {HTMLCanvasElement} canvas */
  constructor(canvas, { maxBars = MAX_BARS } = {}) {
    this.canvas = canvas;
    this.maxBars = maxBars;
    this.bars = []; // sorted by start, one per start (a bar published again replaces it)
    this.dirty = false;
  }

  /** Forget every bar (another channel is shown). */
  clear() {
    this.bars = [];
    this.dirty = true;
  }

  /** Add a bar event, or replace the bar of the same start. */
  update(bar) {
    const bars = this.bars;
    const last = bars[bars.length - 1];
    if (!last || bar.start > last.start) bars.push(bar);
    else {
      const i = bars.findIndex((b) => b.start >= bar.start);
      if (bars[i].start === bar.start) bars[i] = bar;
      else bars.splice(i, 0, bar);
    }
    if (bars.length > this.maxBars) bars.splice(0, bars.length - this.maxBars);
    this.dirty = true;
  }

  /** Redraw if anything changed since the last draw. */
  draw() {
    if (!this.dirty) return;
    this.dirty = false;
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 600;
    const h = canvas.clientHeight || 240;
    if (canvas.width !== Math.round(w * dpr)) canvas.width = Math.round(w * dpr);
    if (canvas.height !== Math.round(h * dpr)) canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const style = getComputedStyle(document.documentElement);
    const color = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
    const up = color("--up", "#3fb950");
    const down = color("--down", "#f85149");
    const muted = color("--muted", "#8b949e");
    const bars = this.bars;
    if (!bars.length) {
      ctx.fillStyle = muted;
      ctx.font = "13px system-ui, sans-serif";
      ctx.fillText("waiting for bars…", 12, 20);
      return;
    }
    const axis = 64; // price labels on the right
    const volH = Math.round(h * 0.22);
    const priceH = h - volH - 8;
    const step = Math.max(2, Math.min(12, (w - axis) / bars.length));
    const shown = bars.slice(-Math.floor((w - axis) / step));
    let lo = Infinity;
    let hi = -Infinity;
    let vmax = 0;
    for (const b of shown) {
      lo = Math.min(lo, b.low);
      hi = Math.max(hi, b.high);
      vmax = Math.max(vmax, b.volume);
    }
    if (hi === lo) {
      hi += 1e-9 + Math.abs(hi) * 1e-4;
      lo -= 1e-9 + Math.abs(lo) * 1e-4;
    }
    const y = (p) => 6 + ((hi - p) / (hi - lo)) * (priceH - 12);
    const body = Math.max(1, step * 0.7);
    shown.forEach((b, i) => {
      const x = i * step + step / 2;
      const rising = b.close >= b.open;
      ctx.strokeStyle = ctx.fillStyle = rising ? up : down;
      ctx.beginPath();
      ctx.moveTo(x, y(b.high));
      ctx.lineTo(x, y(b.low));
      ctx.stroke();
      const top = y(Math.max(b.open, b.close));
      ctx.fillRect(x - body / 2, top, body, Math.max(1, y(Math.min(b.open, b.close)) - top));
      if (vmax > 0) {
        const vh = (b.volume / vmax) * (volH - 2);
        ctx.globalAlpha = 0.5;
        ctx.fillRect(x - body / 2, h - vh, body, vh);
        ctx.globalAlpha = 1;
      }
    });
    ctx.fillStyle = muted;
    ctx.font = "11px system-ui, sans-serif";
    for (const p of [hi, (hi + lo) / 2, lo]) ctx.fillText(String(+p.toPrecision(8)), w - axis + 6, y(p) + 4);
  }

  /** What the chart shows, for tests and the console. */
  summary() {
    const last = this.bars[this.bars.length - 1];
    return { bars: this.bars.length, lastStart: last?.start ?? null, lastClose: last?.close ?? null };
  }
}
