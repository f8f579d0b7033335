/* mlx-relay dashboard: a small canvas line chart (no dependencies, works offline). */
"use strict";

(function () {
  const GRID = "rgba(148, 163, 184, 0.16)";
  const AXIS_TEXT = "#94a3b8";
  const FONT = "11px system-ui, -apple-system, 'Segoe UI', sans-serif";

  /** Round a positive number up to 1, 2 or 5 times a power of ten. */
  function niceCeil(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 5, 10]) {
      if (value <= step * power) return step * power;
    }
    return 10 * power;
  }

  /**
   * A time-series line chart on a canvas.
   * series: [{label, color, values: [number|null]}] sharing `times` (unix seconds).
   * format(y) renders axis and legend values with their unit.
   */
  class LineChart {
    constructor(canvas, options) {
      this.canvas = canvas;
      this.format = (options && options.format) || ((v) => String(v));
      this.minYMax = (options && options.minYMax) || 0;
      this.times = [];
      this.series = [];
      if (typeof ResizeObserver !== "undefined") {
        this.observer = new ResizeObserver(() => this.draw());
        this.observer.observe(canvas);
      }
    }

    update(times, series) {
      this.times = times;
      this.series = series;
      this.draw();
    }

    draw() {
      const canvas = this.canvas;
      const ratio = window.devicePixelRatio || 1;
      const width = canvas.clientWidth;
      const height = canvas.clientHeight;
      if (!width || !height) return;
      if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
        canvas.width = Math.round(width * ratio);
        canvas.height = Math.round(height * ratio);
      }
      const ctx = canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);
      ctx.font = FONT;

      let yMax = this.minYMax;
      for (const s of this.series) {
        for (const v of s.values) if (v !== null && v !== undefined && v > yMax) yMax = v;
      }
      yMax = niceCeil(yMax * 1.1);
      const ticks = [0, 1, 2, 3, 4].map((i) => (yMax * i) / 4);
      const labelWidth = Math.max(...ticks.map((v) => ctx.measureText(this.format(v)).width));
      const pad = { left: Math.ceil(labelWidth) + 12, right: 10, top: 22, bottom: 20 };
      const plotW = Math.max(10, width - pad.left - pad.right);
      const plotH = Math.max(10, height - pad.top - pad.bottom);
      const times = this.times;
      const t0 = times.length ? times[0] : 0;
      const t1 = times.length ? times[times.length - 1] : 1;
      const span = Math.max(1, t1 - t0);
      const x = (t) => pad.left + ((t - t0) / span) * plotW;
      const y = (v) => pad.top + plotH - (v / yMax) * plotH;

      // Horizontal grid with value labels.
      ctx.strokeStyle = GRID;
      ctx.fillStyle = AXIS_TEXT;
      ctx.lineWidth = 1;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (const value of ticks) {
        const py = Math.round(y(value)) + 0.5;
        ctx.beginPath();
        ctx.moveTo(pad.left, py);
        ctx.lineTo(pad.left + plotW, py);
        ctx.stroke();
        ctx.fillText(this.format(value), pad.left - 6, py);
      }
      // Time labels relative to the newest point.
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      for (let i = 0; i <= 4; i++) {
        const t = t0 + (span * i) / 4;
        const ago = t1 - t;
        let label = "now";
        if (ago >= 2 * 86400) label = `-${Math.round(ago / 86400)} d`;
        else if (ago >= 3 * 3600) label = `-${Math.round(ago / 3600)} h`;
        else if (ago >= 120) label = `-${Math.round(ago / 60)} min`;
        else if (span >= 20 && ago >= 0.5) label = `-${Math.round(ago)} s`;
        else if (ago >= 0.05) label = `-${ago.toFixed(1)} s`;
        ctx.fillText(times.length ? label : "", x(t), pad.top + plotH + 5);
      }

      if (times.length < 2) {
        ctx.textAlign = "center";
        ctx.textBaseline = "middle";
        ctx.fillText("collecting…", pad.left + plotW / 2, pad.top + plotH / 2);
      }

      for (const s of this.series) {
        ctx.strokeStyle = s.color;
        ctx.lineWidth = 2;
        ctx.lineJoin = "round";
        ctx.beginPath();
        let drawing = false;
        for (let i = 0; i < times.length; i++) {
          const v = s.values[i];
          if (v === null || v === undefined) {
            drawing = false;
            continue;
          }
          if (drawing) ctx.lineTo(x(times[i]), y(v));
          else ctx.moveTo(x(times[i]), y(v));
          drawing = true;
        }
        ctx.stroke();
      }

      // Legend with the latest value of each series.
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      let lx = pad.left;
      for (const s of this.series) {
        let last = null;
        for (let i = s.values.length - 1; i >= 0; i--) {
          if (s.values[i] !== null && s.values[i] !== undefined) {
            last = s.values[i];
            break;
          }
        }
        const text = `${s.label} ${last === null ? "–" : this.format(last)}`;
        ctx.fillStyle = s.color;
        ctx.fillRect(lx, 7, 10, 3);
        ctx.fillStyle = AXIS_TEXT;
        ctx.fillText(text, lx + 14, 9);
        lx += ctx.measureText(text).width + 30;
      }
    }
  }

  window.RelayCharts = { LineChart };
})();
