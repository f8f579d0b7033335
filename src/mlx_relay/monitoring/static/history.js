/* mlx-relay dashboard: chart ranges backed by the history store, and the request log.
 *
 * The live view shows the snapshot's in-memory chart points, preceded by what the history
 * store kept from before (so a page opened after a restart shows what came before it, with
 * a gap for the time nothing ran). The other ranges read /api/history. When the app has no
 * history store (the page's data-history is 0), the range bar and the request table stay
 * hidden and the charts are live only. A row of the request table opens that request's
 * waterfall (waterfall.js).
 */
"use strict";

(function () {
  const { fmt, el, getJson } = window.RelayUI;

  const CHART_FIELDS = [
    "tokens_per_second",
    "requests_per_second",
    "e2e_p50_seconds",
    "e2e_p99_seconds",
    "ttft_p50_seconds",
  ];
  const RANGES = { live: 0, "15m": 900, "1h": 3600, "24h": 86400, "7d": 604800, "30d": 2592000 };
  const RANGE_POINTS = 360;
  const BACKFILL_SECONDS = 900;

  const state = {
    enabled: false,
    range: "live",
    available: new Set(), // chart fields the store has
    backfill: { times: [], values: {} }, // live view: what came before the in-memory points
    ranged: { times: [], values: {} }, // the selected range, from /api/history
    loading: false,
    redraw: null,
  };

  async function fetchCharts(after, before, points) {
    const fields = CHART_FIELDS.filter((f) => state.available.has(f));
    const out = { times: [], values: {}, step: 0 };
    if (!fields.length) return out;
    const params = new URLSearchParams({ after, before, points, group: "avg" });
    for (const f of fields) params.append("series", `chart.${f}`);
    const data = await getJson("/api/history", params);
    out.step = data.step_seconds;
    out.times = data.timestamps.map((t) => t + data.step_seconds / 2);
    for (const s of data.series) out.values[s.key.slice("chart.".length)] = s.values;
    return out;
  }

  // ---- what the charts draw ------------------------------------------------------------------

  /** The chart data for the current range: {times, pick(field) -> values}. */
  function chartData(snapshot) {
    const interval = snapshot.collection_interval_seconds || 2;
    if (state.enabled && state.range !== "live") {
      const data = state.ranged;
      return { times: data.times, pick: (f) => data.values[f] || data.times.map(() => null) };
    }
    const live = snapshot.history;
    const first = live.length ? live[0].timestamp : Infinity;
    const back = state.backfill;
    const step = back.step || interval;
    const times = [];
    const rows = [];
    let dataEnd = -Infinity; // end of the last backfilled bucket that holds a value
    back.times.forEach((t, i) => {
      if (t < first - interval) {
        times.push(t);
        rows.push((f) => (back.values[f] ? back.values[f][i] : null));
        const held = Object.values(back.values).some((v) => v[i] !== null && v[i] !== undefined);
        if (held) dataEnd = t + step / 2;
      }
    });
    // More than a bucket (or three samples) between the stored data and the live points:
    // nothing was recorded in between, so draw a gap rather than a line across it.
    if (times.length && live.length && first - dataEnd > Math.max(step, 3 * interval)) {
      times.push((times[times.length - 1] + first) / 2);
      rows.push(() => null);
    }
    for (const p of live) {
      times.push(p.timestamp);
      rows.push((f) => (p[f] === undefined ? null : p[f]));
    }
    return { times, pick: (f) => rows.map((row) => row(f)) };
  }

  async function loadBackfill() {
    const now = Date.now() / 1000;
    const data = await fetchCharts(now - BACKFILL_SECONDS, now, RANGE_POINTS);
    state.backfill = data;
    if (state.redraw) state.redraw();
  }

  async function loadRange() {
    const seconds = RANGES[state.range];
    if (!seconds || state.loading) return;
    state.loading = true;
    try {
      const now = Date.now() / 1000;
      state.ranged = await fetchCharts(now - seconds, now, RANGE_POINTS);
      document.body.dataset.historyRange = state.range;
      document.body.dataset.historyPoints = String(state.ranged.times.length);
    } catch (err) {
      console.warn("mlx-relay: history unavailable", err);
    } finally {
      state.loading = false;
    }
    if (state.redraw) state.redraw();
  }

  function selectRange(range) {
    state.range = range;
    document.body.dataset.historyRange = range;
    for (const button of document.querySelectorAll("#range-bar button")) {
      button.classList.toggle("active", button.dataset.range === range);
    }
    if (range === "live") {
      if (state.redraw) state.redraw();
    } else {
      state.ranged = { times: [], values: {} };
      delete document.body.dataset.historyPoints;
      loadRange();
    }
  }

  // ---- request log -------------------------------------------------------------------------

  const table = { order: "newest", status: "" };

  function cell(text, className) {
    return el("td", className || "", text);
  }

  async function loadRequests() {
    const params = { order: table.order, limit: 50 };
    if (table.status) params.status = table.status;
    let page;
    try {
      page = await getJson("/api/requests", params);
    } catch (err) {
      console.warn("mlx-relay: request log unavailable", err);
      return;
    }
    const tbody = document.querySelector("#requests tbody");
    tbody.replaceChildren();
    const summary = document.getElementById("requests-total");
    summary.textContent = `${fmt.count(page.total)} in the log`;
    document.getElementById("requests").dataset.total = String(page.total);
    if (!page.requests.length) {
      const tr = el("tr");
      const td = cell("no requests", "muted");
      td.colSpan = 8;
      tr.appendChild(td);
      tbody.appendChild(tr);
      return;
    }
    for (const r of page.requests) {
      const tr = el("tr");
      tr.dataset.requestId = r.request_id;
      tr.dataset.status = r.status;
      tr.className = "clickable";
      tr.tabIndex = 0;
      tr.title = "open this request's waterfall";
      const stages = Object.entries(r.stage_seconds)
        .map(([device, s]) => `${device} ${fmt.seconds(s)}`)
        .join(" · ");
      tr.appendChild(cell(fmt.clock(r.arrival)));
      tr.appendChild(cell(r.status === "error" ? r.error_type || "error" : r.finish_reason || r.status, r.status === "error" ? "error-text" : ""));
      tr.appendChild(cell(`${fmt.count(r.prompt_tokens)} / ${fmt.count(r.generated_tokens)}`));
      tr.appendChild(cell(fmt.seconds(r.queue_seconds)));
      tr.appendChild(cell(fmt.seconds(r.ttft_seconds)));
      tr.appendChild(cell(fmt.seconds(r.e2e_seconds)));
      tr.appendChild(cell(stages || "–", "muted"));
      tr.appendChild(cell(r.request_id.slice(0, 12), "muted mono"));
      tbody.appendChild(tr);
    }
    window.RelayWaterfall.markSelected();
  }

  function initRequestTable() {
    for (const th of document.querySelectorAll("#requests th[data-sort]")) {
      th.addEventListener("click", () => {
        const [first, second] = th.dataset.sort.split("|");
        table.order = table.order === first ? second : first;
        for (const other of document.querySelectorAll("#requests th[data-sort]")) {
          other.classList.toggle("sorted", other === th);
        }
        loadRequests();
      });
    }
    // A row opens its request's waterfall (waterfall.js), by click or Enter.
    const tbody = document.querySelector("#requests tbody");
    const openRow = (event) => {
      const row = event.target.closest("tr[data-request-id]");
      if (row) window.RelayWaterfall.open(row.dataset.requestId);
    };
    tbody.addEventListener("click", openRow);
    tbody.addEventListener("keydown", (event) => {
      if (event.key === "Enter") openRow(event);
    });
    document.getElementById("requests-status").addEventListener("change", (event) => {
      table.status = event.target.value;
      loadRequests();
    });
  }

  async function showStore() {
    const catalogue = await getJson("/api/history/series");
    const store = catalogue.store;
    const lag = store.write_lag_seconds === null ? "–" : fmt.seconds(store.write_lag_seconds);
    document.getElementById("history-store").textContent =
      `history: ${fmt.bytes(store.bytes)} of ${fmt.bytes(store.max_bytes)} · ${fmt.count(store.series)} series · ` +
      `${fmt.count(store.request_rows)} requests · write lag ${lag}`;
    for (const s of catalogue.series) {
      if (s.key.startsWith("chart.")) state.available.add(s.key.slice("chart.".length));
    }
  }

  // ---- start -------------------------------------------------------------------------------

  async function start(redraw) {
    state.redraw = redraw;
    if (document.body.dataset.history !== "1") return;
    try {
      await showStore();
    } catch (err) {
      console.warn("mlx-relay: history unavailable", err);
      return;
    }
    state.enabled = true;
    for (const id of ["range-bar", "requests-panel", "history-store"]) {
      document.getElementById(id).classList.remove("hidden");
    }
    for (const button of document.querySelectorAll("#range-bar button")) {
      button.addEventListener("click", () => selectRange(button.dataset.range));
    }
    initRequestTable();
    await Promise.all([loadBackfill().catch((err) => console.warn("mlx-relay: no backfill", err)), loadRequests()]);
    document.body.dataset.historyReady = "1";
    setInterval(() => {
      if (state.range !== "live") loadRange();
      loadRequests();
      showStore().catch(() => {});
    }, 10000);
  }

  window.RelayHistory = { start, chartData, state };
})();
