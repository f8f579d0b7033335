/* mlx-relay dashboard: number formatting with units, small DOM helpers, and the JSON fetch
 * every panel uses (the page's ?token= travels as a bearer header, never in an /api URL). */
"use strict";

(function () {
  // ---- formatting: every number leaves with its unit ------------------------------------

  const fmt = {
    bytes(n) {
      if (n === null || n === undefined) return "n/a";
      const units = ["B", "KB", "MB", "GB", "TB"];
      let value = n;
      let i = 0;
      while (Math.abs(value) >= 1000 && i < units.length - 1) {
        value /= 1000;
        i++;
      }
      const digits = i === 0 ? 0 : value >= 100 ? 0 : value >= 10 ? 1 : 2;
      return `${value.toFixed(digits)} ${units[i]}`;
    },
    seconds(s) {
      if (s === null || s === undefined) return "–";
      if (s === 0) return "0 ms";
      if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
      if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : s < 0.1 ? 1 : 0)} ms`;
      if (s < 120) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
      return `${(s / 60).toFixed(1)} min`;
    },
    percent(r) {
      if (r === null || r === undefined) return "n/a";
      const p = r * 100;
      return `${p.toFixed(p < 10 ? 1 : 0)} %`;
    },
    rate(v, unit) {
      if (v === null || v === undefined) return "–";
      if (v === 0) return `0 ${unit}`;
      return `${v.toFixed(v < 10 ? 2 : v < 100 ? 1 : 0)} ${unit}`;
    },
    count(n) {
      return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
    },
    duration(s) {
      if (s === null || s === undefined) return "–";
      if (s < 60) return `${Math.floor(s)} s`;
      if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
      return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    },
    ago(ts) {
      if (!ts) return "never";
      const s = Math.max(0, Date.now() / 1000 - ts);
      return s < 1.5 ? "just now" : `${fmt.duration(s)} ago`;
    },
    clock(ts) {
      return new Date(ts * 1000).toLocaleTimeString("en-GB");
    },
  };

  // ---- DOM helpers -------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node && node.textContent !== text) node.textContent = text;
  }

  function badge(node, status) {
    const state = ["healthy", "warning", "critical", "unknown"].includes(status) ? status : "unknown";
    node.textContent = state;
    node.className = `badge badge-${state}`;
  }

  function meter(className) {
    const outer = el("div", `meter ${className || ""}`);
    const inner = el("div", "meter-fill");
    outer.appendChild(inner);
    return { outer, inner };
  }

  function setMeter(m, ratio, hotAt = 0.85) {
    const r = ratio === null || ratio === undefined ? 0 : Math.max(0, Math.min(1, ratio));
    m.inner.style.width = `${(r * 100).toFixed(1)}%`;
    m.outer.classList.toggle("hot", r >= hotAt);
  }

  // ---- the monitoring API ------------------------------------------------------------------

  const token = new URLSearchParams(window.location.search).get("token");
  const authHeaders = token ? { Authorization: `Bearer ${token}` } : {};

  /** GET path?params as JSON; a failed answer throws an Error with its `status` and, when
   * the API said why, its `detail` (the error body's "detail"). */
  async function getJson(path, params) {
    const query = new URLSearchParams(params || {}).toString();
    const response = await fetch(query ? `${path}?${query}` : path, { headers: authHeaders });
    if (!response.ok) {
      const error = new Error(`${path}: HTTP ${response.status}`);
      error.status = response.status;
      error.detail = await response.json().then((body) => body.detail, () => null);
      throw error;
    }
    return response.json();
  }

  window.RelayUI = { fmt, el, setText, badge, meter, setMeter, token, authHeaders, getJson };
})();
