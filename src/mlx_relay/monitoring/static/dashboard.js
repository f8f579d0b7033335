/* mlx-relay dashboard: renders the live snapshot pushed over /ws (no dependencies). */
"use strict";

(function () {
  const body = document.body;
  const token = new URLSearchParams(window.location.search).get("token");
  const updateInterval = parseFloat(body.dataset.updateInterval) || 2;

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

  // ---- device cards ------------------------------------------------------------------------

  function orderedDevices(snapshot) {
    const devices = Object.assign({}, snapshot.devices);
    if (!devices[snapshot.device_id]) {
      devices[snapshot.device_id] = {
        device_id: snapshot.device_id,
        role: snapshot.role,
        up: true,
        metrics: snapshot.device,
      };
    }
    const rank = (d) => {
      if (d.role === "coordinator") return [0, 0];
      if (d.stage !== null && d.stage !== undefined) return [2, d.stage];
      return [d.role === "worker" ? 3 : 1, 0];
    };
    return Object.values(devices).sort((a, b) => {
      const ra = rank(a);
      const rb = rank(b);
      return ra[0] - rb[0] || ra[1] - rb[1] || a.device_id.localeCompare(b.device_id);
    });
  }

  const cards = new Map();

  function row(label) {
    const line = el("div", "row");
    line.appendChild(el("span", "row-label", label));
    const value = el("span", "row-value");
    line.appendChild(value);
    return { line, value };
  }

  function createCard(deviceId) {
    const card = el("article", "device-card");
    card.dataset.deviceId = deviceId;
    const head = el("div", "card-head");
    const title = el("div", "card-title");
    const role = el("span", "role");
    title.appendChild(role);
    title.appendChild(el("span", "device-name", deviceId));
    head.appendChild(title);
    const health = el("span", "badge");
    head.appendChild(health);
    card.appendChild(head);
    const placement = el("div", "placement muted");
    card.appendChild(placement);
    const seen = el("div", "seen");
    card.appendChild(seen);

    const cpu = row("CPU");
    const cpuMeter = meter();
    cpu.line.appendChild(cpuMeter.outer);
    const mem = row("Memory");
    const memMeter = meter();
    mem.line.appendChild(memMeter.outer);
    const rss = row("Process");
    const mlx = row("MLX memory");
    const gpu = row("GPU");
    const compute = row("Compute");
    for (const r of [cpu, mem, rss, mlx, gpu, compute]) card.appendChild(r.line);
    const parts = { card, role, health, placement, seen, cpu, cpuMeter, mem, memMeter, rss, mlx, gpu, compute };
    cards.set(deviceId, parts);
    return parts;
  }

  function updateCard(parts, device, snapshot, status) {
    const m = device.metrics;
    parts.role.textContent = device.role || "device";
    parts.role.className = `role role-${device.role || "device"}`;
    badge(parts.health, status);
    parts.card.classList.toggle("down", device.up === false);

    if (device.role === "coordinator") {
      parts.placement.textContent = "tokenizer · scheduler · API";
    } else if (device.role === "dashboard") {
      parts.placement.textContent = "standalone monitor · polls the workers";
    } else if (device.layer_start !== null && device.layer_start !== undefined) {
      const n = device.layer_end - device.layer_start;
      const stage = device.stage === null || device.stage === undefined ? "?" : device.stage;
      parts.placement.textContent = `stage ${stage} · layers ${device.layer_start}–${device.layer_end - 1} (${n})`;
    } else {
      parts.placement.textContent = device.model_loaded === false ? "model not loaded" : "layers unknown";
    }

    if (device.up === false) {
      parts.seen.textContent = `down · ${device.last_error || "unreachable"} · seen ${fmt.ago(device.last_seen_timestamp)}`;
      parts.seen.className = "seen seen-down";
    } else {
      parts.seen.textContent = `up · seen ${fmt.ago(device.last_seen_timestamp)}`;
      parts.seen.className = "seen";
    }

    if (!m) {
      for (const r of [parts.cpu, parts.mem, parts.rss, parts.mlx, parts.gpu]) r.value.textContent = "no sample yet";
      setMeter(parts.cpuMeter, null);
      setMeter(parts.memMeter, null);
    } else {
      parts.cpu.value.textContent =
        m.cpu_utilization_ratio === null ? "n/a" : `${fmt.percent(m.cpu_utilization_ratio)} of ${m.cpu_count} cores`;
      parts.cpu.value.title = m.cpu_unavailable_reason || (m.chip || "");
      setMeter(parts.cpuMeter, m.cpu_utilization_ratio);
      parts.mem.value.textContent = `${fmt.bytes(m.memory_used_bytes)} / ${fmt.bytes(m.memory_total_bytes)}`;
      setMeter(parts.memMeter, m.memory_used_ratio);
      parts.rss.value.textContent = `${fmt.bytes(m.process_resident_memory_bytes)} resident`;
      if (m.mlx_memory_active_bytes === null || m.mlx_memory_active_bytes === undefined) {
        parts.mlx.value.textContent = "n/a";
        parts.mlx.value.title = m.mlx_unavailable_reason || "not measured";
      } else {
        parts.mlx.value.textContent = `${fmt.bytes(m.mlx_memory_active_bytes)} (peak ${fmt.bytes(m.mlx_memory_peak_bytes)})`;
        parts.mlx.value.title = `cache ${fmt.bytes(m.mlx_memory_cache_bytes)} · MLX ${m.mlx_version || "?"} on ${m.mlx_device || "?"}`;
      }
      if (m.gpu_utilization_ratio === null || m.gpu_utilization_ratio === undefined) {
        parts.gpu.value.textContent = "n/a";
        parts.gpu.value.title = m.gpu_unavailable_reason || "no GPU measurement on this platform";
        parts.gpu.value.classList.add("has-reason");
      } else {
        const memory = m.gpu_memory_used_bytes !== null ? ` · ${fmt.bytes(m.gpu_memory_used_bytes)}` : "";
        parts.gpu.value.textContent = `${fmt.percent(m.gpu_utilization_ratio)}${memory}`;
        parts.gpu.value.title = `${m.gpu_name || "GPU"} (${m.gpu_source || "?"})`;
        parts.gpu.value.classList.remove("has-reason");
      }
    }

    const stage = snapshot.stages[device.device_id];
    if (stage) {
      const decode = stage.forward_seconds.decode;
      parts.compute.value.textContent = `${fmt.seconds(decode && decode.mean)}/decode step · ${fmt.percent(stage.utilization_ratio_10s)} busy`;
      parts.compute.line.classList.remove("hidden");
    } else {
      parts.compute.line.classList.add("hidden");
    }
  }

  function renderDevices(snapshot, health) {
    const container = document.getElementById("devices");
    const statusOf = {};
    for (const d of health.devices) statusOf[d.device_id] = d.status;
    const devices = orderedDevices(snapshot);
    const order = devices.map((d) => d.device_id).join("|");
    if (container.dataset.order !== order) {
      container.replaceChildren();
      devices.forEach((device, i) => {
        if (i > 0) container.appendChild(el("div", "arrow", "→"));
        const parts = cards.get(device.device_id) || createCard(device.device_id);
        container.appendChild(parts.card);
      });
      container.dataset.order = order;
    }
    for (const device of devices) {
      updateCard(cards.get(device.device_id), device, snapshot, statusOf[device.device_id] || "unknown");
    }
  }

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

  function renderCharts(snapshot) {
    const history = snapshot.history;
    const times = history.map((p) => p.timestamp);
    const pick = (key) => history.map((p) => (p[key] === undefined ? null : p[key]));
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
      container.appendChild(line);
    }
  }

  function renderLinks(snapshot) {
    const tbody = document.querySelector("#links tbody");
    const links = snapshot.network.links;
    if (!links.length) return;
    tbody.replaceChildren();
    for (const link of links) {
      const tr = el("tr");
      const failed = (link.ping_total.error || 0) + (link.ping_total.timeout || 0);
      const cells = [
        `${link.device} → ${link.peer}`,
        fmt.seconds(link.rtt_last_seconds),
        link.rtt.count ? `${fmt.seconds(link.rtt.p50)} / ${fmt.seconds(link.rtt.p99)}` : "–",
        `${fmt.count(link.ping_total.ok || 0)} / ${fmt.count(failed)}`,
        fmt.bytes(link.transmit_bytes_total),
        fmt.bytes(link.receive_bytes_total),
        link.last_error ? `${link.last_error} (${fmt.ago(link.last_error_timestamp)})` : "–",
      ];
      cells.forEach((text, i) => tr.appendChild(el("td", i === 6 && link.last_error ? "error-text" : "", text)));
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

  // Links on the page carry the token as well (they cannot set an Authorization header).
  function tokenizeLinks() {
    if (!token) return;
    const link = document.getElementById("api-link");
    if (link) link.href = `/api/metrics?token=${encodeURIComponent(token)}`;
  }

  /** fetch() with the page's token; for callers of the JSON API from this page. */
  window.relayFetch = function (path) {
    return fetch(path, { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  };

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
  connect();
  setInterval(watchStaleness, 1000);
})();
