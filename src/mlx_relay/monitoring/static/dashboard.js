/* mlx-relay dashboard: renders the live snapshot pushed over /ws (no dependencies). */
"use strict";

(function () {
  const body = document.body;
  const token = new URLSearchParams(window.location.search).get("token");
  const updateInterval = parseFloat(body.dataset.updateInterval) || 2;

  const { fmt, el, setText, badge, meter, setMeter } = window.RelayUI;
  const { renderDevices } = window.RelayDevices;

  // ---- numbers and charts -----------------------------------------------------------------

  function renderHeader(snapshot, health) {
    const inference = snapshot.inference;
    setText("total-requests", fmt.count(inference.requests_total));
    setText("total-tokens", fmt.count(inference.generation_tokens_total));
    setText("uptime", fmt.duration(snapshot.uptime_seconds));
    const model = snapshot.model;
    setText(
      "model-name",
      model ? `${model.model_name} · ${model.quantization} · ${model.num_layers} layers / ${model.num_stages} stages` : "no model loaded"
    );
    badge(document.getElementById("overall-health"), health.overall_status);
  }

  function renderKpis(snapshot) {
    const inference = snapshot.inference;
    const w10 = inference.windows["10s"] || {};
    const w60 = inference.windows["60s"] || {};
    const lat = inference.latency;
    const p50 = (s) => (s && s.count ? fmt.seconds(s.p50) : "–");
    const p99 = (s) => (s && s.count ? `p99 ${fmt.seconds(s.p99)}` : "no samples yet");
    setText("kpi-rps", fmt.rate(w10.requests_per_second, "req/s"));
    setText("kpi-rps-sub", `60 s: ${fmt.rate(w60.requests_per_second, "req/s")}`);
    setText("kpi-tps", fmt.rate(w10.tokens_per_second, "tok/s"));
    setText("kpi-tps-sub", `60 s: ${fmt.rate(w60.tokens_per_second, "tok/s")}`);
    for (const [id, key] of [["kpi-e2e-sub", "e2e"], ["kpi-ttft-sub", "ttft"], ["kpi-itl-sub", "inter_token"]]) {
      const summary = lat[key];
      document.getElementById(id).title = summary && summary.count ? `${fmt.count(summary.count)} recent samples, max ${fmt.seconds(summary.max)}` : "";
    }
    setText("kpi-e2e", p50(lat.e2e));
    setText("kpi-e2e-sub", p99(lat.e2e));
    setText("kpi-ttft", p50(lat.ttft));
    setText("kpi-ttft-sub", p99(lat.ttft));
    setText("kpi-itl", p50(lat.inter_token));
    setText("kpi-itl-sub", p99(lat.inter_token));
    const recovery = lat.recovery;
    setText("kpi-recovery", p50(recovery));
    setText("kpi-recovery-sub", recovery && recovery.count ? `p99 ${fmt.seconds(recovery.p99)} · ${fmt.count(recovery.count)} recovered` : "no stage failure");
    setText("kpi-running", `${inference.requests_running} / ${inference.requests_waiting}`);
    setText("kpi-running-sub", `prompt ${fmt.rate(w10.prompt_tokens_per_second, "tok/s")}`);
    setText("kpi-errors", w60.error_rate === null || w60.error_rate === undefined ? "–" : fmt.percent(w60.error_rate));
    const failed = Object.values(inference.failure_total).reduce((a, b) => a + b, 0);
    setText("kpi-errors-sub", `${fmt.count(failed)} failed since start`);
  }

  const charts = {};

  function initCharts() {
    const LineChart = window.RelayCharts.LineChart;
    charts.tokens = new LineChart(document.getElementById("chart-tokens"), { format: (v) => fmt.rate(v, "tok/s") });
    charts.requests = new LineChart(document.getElementById("chart-requests"), { format: (v) => fmt.rate(v, "req/s") });
    charts.latency = new LineChart(document.getElementById("chart-latency"), { format: fmt.seconds });
    charts.ttft = new LineChart(document.getElementById("chart-ttft"), { format: fmt.seconds });
  }

  let lastSnapshot = null;

  function renderCharts(snapshot) {
    lastSnapshot = snapshot;
    // Live points, preceded by the history store's backfill, or the selected range.
    const { times, pick } = window.RelayHistory.chartData(snapshot);
    charts.tokens.update(times, [{ label: "tokens/s", color: "#38bdf8", values: pick("tokens_per_second") }]);
    charts.requests.update(times, [{ label: "requests/s", color: "#a78bfa", values: pick("requests_per_second") }]);
    charts.latency.update(times, [
      { label: "p50", color: "#34d399", values: pick("e2e_p50_seconds") },
      { label: "p99", color: "#fbbf24", values: pick("e2e_p99_seconds") },
    ]);
    charts.ttft.update(times, [{ label: "p50", color: "#f472b6", values: pick("ttft_p50_seconds") }]);
  }

  function renderStages(snapshot) {
    const container = document.getElementById("stages");
    const stages = Object.values(snapshot.stages).sort(
      (a, b) => (a.stage === null ? 1e9 : a.stage) - (b.stage === null ? 1e9 : b.stage) || a.device_id.localeCompare(b.device_id)
    );
    if (!stages.length) return;
    const max = Math.max(...stages.map((s) => s.busy_seconds_total));
    container.replaceChildren();
    for (const s of stages) {
      const isMax = max > 0 && s.busy_seconds_total === max && stages.length > 1;
      const line = el("div", `stage${isMax ? " bottleneck" : ""}`);
      line.dataset.deviceId = s.device_id;
      const label = el("div", "stage-label");
      label.appendChild(el("span", "stage-name", `stage ${s.stage === null ? "?" : s.stage} · ${s.device_id}`));
      if (isMax) label.appendChild(el("span", "tag", "bottleneck"));
      line.appendChild(label);
      const bar = meter("stage-bar");
      setMeter(bar, max > 0 ? s.busy_seconds_total / max : 0, Infinity);
      line.appendChild(bar.outer);
      const decode = s.forward_seconds.decode || {};
      const prefill = s.forward_seconds.prefill || {};
      line.appendChild(
        el(
          "div",
          "stage-detail muted",
          `busy ${fmt.seconds(s.busy_seconds_total)} · ${fmt.percent(s.utilization_ratio_10s)} of last 10 s · ` +
            `decode ${fmt.seconds(decode.mean)}/step · prefill ${fmt.seconds(prefill.mean)}/call · ` +
            `${fmt.count((s.steps_total.decode || 0) + (s.steps_total.prefill || 0))} calls · ${s.kv_sessions} KV sessions`
        )
      );
      line.appendChild(renderOccupancy(s, (snapshot.occupancy || {})[s.device_id]));
      container.appendChild(line);
    }
  }

  // The coordinator's view of a stage: how many requests each Forward carries, how many
  // Forwards are outstanding, and the share of the last 10 s it idled while requests waited.
  // A standalone dashboard has no step loop: the batch size then comes from the stage's
  // own histogram (mean since start).
  function renderOccupancy(stage, occupancy) {
    const row = el("div", "stage-occupancy muted");
    const histogram = stage.batch_size;
    let batch = "–";
    if (occupancy && occupancy.batch_size_mean !== null) {
      batch = `${occupancy.batch_size_mean.toFixed(1)} mean · ${occupancy.batch_size_last} last`;
    } else if (histogram && histogram.count > 0) {
      batch = `${(histogram.sum / histogram.count).toFixed(1)} mean since start`;
    }
    const parts = [
      ["batch-size", `batch ${batch}`],
      ["in-flight", `${occupancy ? occupancy.microbatches_in_flight : "–"} in flight`],
      // From the stages' own compute windows (docs/monitoring-api.md, "Stage occupancy").
      ["bubble", `bubble ${occupancy ? fmt.percent(occupancy.bubble_ratio) : "n/a"}`],
    ];
    parts.forEach(([field, text], i) => {
      if (i > 0) row.appendChild(document.createTextNode(" · "));
      const span = el("span", "", text);
      span.dataset.field = field;
      row.appendChild(span);
    });
    return row;
  }

  // Column keys of the links table, in order (data-column on each cell).
  const LINK_COLUMNS = ["link", "network-rtt", "network-rtt-p50-p99", "rpc-overhead", "ping-rpc", "transfer", "pings", "sent", "received", "error"];

  function renderLinks(snapshot) {
    const tbody = document.querySelector("#links tbody");
    const links = snapshot.network.links;
    if (!links.length) return;
    tbody.replaceChildren();
    for (const link of links) {
      const tr = el("tr");
      const failed = (link.ping_total.error || 0) + (link.ping_total.timeout || 0);
      const rtt = link.rtt_last_seconds === null ? `– (${link.rtt_unavailable_reason || "n/a"})` : fmt.seconds(link.rtt_last_seconds);
      const cells = [
        `${link.device} → ${link.peer}`,
        rtt,
        link.rtt.count ? `${fmt.seconds(link.rtt.p50)} / ${fmt.seconds(link.rtt.p99)}` : "–",
        link.rpc_overhead.count ? `${fmt.seconds(link.rpc_overhead.p50)} / ${fmt.seconds(link.rpc_overhead.p99)}` : "–",
        link.ping_rtt.count ? fmt.seconds(link.ping_rtt.p50) : "–",
        link.transfer.count ? fmt.seconds(link.transfer.p50) : "–",
        `${fmt.count(link.ping_total.ok || 0)} / ${fmt.count(failed)}`,
        fmt.bytes(link.transmit_bytes_total),
        fmt.bytes(link.receive_bytes_total),
        link.last_error ? `${link.last_error} (${fmt.ago(link.last_error_timestamp)})` : "–",
      ];
      const errorColumn = cells.length - 1;
      cells.forEach((text, i) => {
        const td = el("td", i === errorColumn && link.last_error ? "error-text" : "", text);
        td.dataset.column = LINK_COLUMNS[i];
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    }
  }

  function renderChecks(health) {
    const list = document.getElementById("checks");
    setText("health-device", `on ${health.device_id} · ${health.local_status}`);
    list.replaceChildren();
    const checks = Object.values(health.checks);
    for (const check of checks) {
      const item = el("li", "check");
      const b = el("span", "badge");
      badge(b, check.status);
      item.appendChild(b);
      const text = el("div", "check-text");
      text.appendChild(el("span", "check-name", check.name));
      text.appendChild(el("span", "check-message muted", check.message || check.description));
      item.title = `${check.description}${check.last_run_timestamp ? ` · last run ${fmt.ago(check.last_run_timestamp)}` : ""}`;
      item.appendChild(text);
      list.appendChild(item);
    }
    for (const device of health.devices) {
      if (device.device_id === health.device_id) continue;
      const item = el("li", "check");
      const b = el("span", "badge");
      badge(b, device.status);
      item.appendChild(b);
      const text = el("div", "check-text");
      text.appendChild(el("span", "check-name", `device ${device.device_id}`));
      const message = device.up === false ? `down: ${device.last_error || "unreachable"}` : `up, reports ${device.health_status || "unknown"}`;
      text.appendChild(el("span", "check-message muted", message));
      item.appendChild(text);
      list.appendChild(item);
    }
    if (!list.children.length) list.appendChild(el("li", "muted", "no checks yet"));
  }

  function renderErrors(snapshot) {
    const tbody = document.querySelector("#errors tbody");
    const errors = snapshot.inference.recent_errors.slice().reverse();
    tbody.replaceChildren();
    if (!errors.length) {
      const tr = el("tr");
      const td = el("td", "muted", "no errors");
      td.colSpan = 3;
      tr.appendChild(td);
      tbody.appendChild(tr);
      return;
    }
    for (const e of errors) {
      const tr = el("tr");
      tr.appendChild(el("td", "", fmt.clock(e.timestamp)));
      tr.appendChild(el("td", "error-text", e.error_type));
      tr.appendChild(el("td", "", e.message));
      tbody.appendChild(tr);
    }
  }

  function render(update) {
    const snapshot = update.snapshot;
    const health = update.health;
    renderHeader(snapshot, health);
    renderDevices(snapshot, health);
    renderKpis(snapshot);
    renderCharts(snapshot);
    renderStages(snapshot);
    renderLinks(snapshot);
    renderChecks(health);
    renderErrors(snapshot);
    document.dispatchEvent(new CustomEvent("relay:update", { detail: update }));
  }

  // ---- connection with reconnect and backoff -------------------------------------------------

  const banner = document.getElementById("connection-banner");
  const state = document.getElementById("connection-state");
  let retryDelay = 0.5;
  let countdown = null;

  function setState(text, className) {
    state.textContent = text;
    state.className = `conn ${className}`;
  }

  function showBanner(text) {
    banner.textContent = text;
    banner.classList.remove("hidden");
  }

  function socketUrl() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    return `${scheme}//${window.location.host}/ws${query}`;
  }

  function scheduleReconnect(reason) {
    const delay = retryDelay * (0.8 + Math.random() * 0.4);
    retryDelay = Math.min(retryDelay * 2, 15);
    let left = Math.ceil(delay);
    setState("disconnected", "conn-down");
    showBanner(`disconnected — retrying in ${left} s${reason ? ` (${reason})` : ""}`);
    clearInterval(countdown);
    countdown = setInterval(() => {
      left -= 1;
      if (left > 0) showBanner(`disconnected — retrying in ${left} s${reason ? ` (${reason})` : ""}`);
      else showBanner("disconnected — retrying now…");
    }, 1000);
    setTimeout(connect, delay * 1000);
  }

  function connect() {
    clearInterval(countdown);
    setState("connecting", "conn-wait");
    const socket = new WebSocket(socketUrl());
    socket.onopen = () => {
      retryDelay = 0.5;
      setState("live", "conn-up");
      banner.classList.add("hidden");
    };
    socket.onmessage = (event) => {
      let update;
      try {
        update = JSON.parse(event.data);
      } catch (err) {
        console.warn("mlx-relay: unreadable update", err);
        return;
      }
      lastMessageAt = Date.now();
      if (!state.classList.contains("conn-up")) setState("live", "conn-up");
      render(update);
      body.dataset.sequence = String(update.sequence);
    };
    socket.onclose = (event) => {
      const reason = event.code === 1008 ? "invalid or missing token: open the page with ?token=…" : "";
      scheduleReconnect(reason);
    };
  }

  // /api/* takes the token only in a header (a token in a URL ends up in proxy logs): with a
  // token, the raw-data link fetches the JSON with the header and opens what came back.
  function tokenizeLinks() {
    if (!token) return;
    const link = document.getElementById("api-link");
    if (!link) return;
    link.addEventListener("click", async (event) => {
      event.preventDefault();
      const response = await fetch(link.getAttribute("href"), { headers: { Authorization: `Bearer ${token}` } });
      const blob = new Blob([await response.text()], { type: "application/json" });
      window.open(URL.createObjectURL(blob), "_blank", "noopener");
    });
  }

  // An open socket that stopped delivering (server stalled) is flagged, not trusted.
  let lastMessageAt = Date.now();
  function watchStaleness() {
    const quiet = (Date.now() - lastMessageAt) / 1000;
    if (state.classList.contains("conn-up") && quiet > Math.max(5, 3 * updateInterval)) {
      setState("stale", "conn-wait");
    }
  }

  tokenizeLinks();
  initCharts();
  window.RelayDashboardCharts = charts;
  window.RelayHistory.start(() => lastSnapshot && renderCharts(lastSnapshot));
  window.RelayAttribution.startProfile();
  connect();
  setInterval(watchStaleness, 1000);
})();
