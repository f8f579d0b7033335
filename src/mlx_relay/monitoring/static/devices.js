/* mlx-relay dashboard: one card per device, laid out in pipeline order. */
"use strict";

(function () {
  const { fmt, el, badge, meter, setMeter } = window.RelayUI;

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
    const engine = row("Engine");
    engine.line.classList.add("engine");
    const restarts = row("Restarts");
    restarts.line.classList.add("restarts");
    restarts.line.hidden = true;
    for (const r of [cpu, mem, rss, mlx, gpu, compute, engine, restarts]) card.appendChild(r.line);
    const parts = { card, role, health, placement, seen, cpu, cpuMeter, mem, memMeter, rss, mlx, gpu, compute, engine, restarts };
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

    // Only workers supervised by `mlx-relay up` have a restart count.
    const supervised = device.restarts !== null && device.restarts !== undefined;
    parts.restarts.line.hidden = !supervised;
    if (supervised) parts.restarts.value.textContent = String(device.restarts);

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

    // How the stage computes: MLX backend, its weights, and the CPU BLAS with its threads.
    if (device.backend) {
      const blas = device.backend === "cpu" ? ` · BLAS ${device.blas || "?"} × ${device.blas_threads ?? "?"}` : "";
      parts.engine.value.textContent = `${device.backend} · ${device.compute || "?"}${blas}`;
      parts.engine.line.classList.remove("hidden");
    } else {
      parts.engine.line.classList.add("hidden");
    }
  }

  // Devices in pipeline order, the replicas of a stage (workers with the same stage index)
  // in one group.
  function stageGroups(devices) {
    const groups = [];
    for (const device of devices) {
      const last = groups[groups.length - 1];
      const staged = device.stage !== null && device.stage !== undefined;
      if (last && staged && last[0].stage === device.stage) last.push(device);
      else groups.push([device]);
    }
    return groups;
  }

  // A stage with replicas: healthy while all answer, degraded (warning) while some do,
  // down (critical) when none does (a replica answers unless its last poll failed).
  function renderGroupStatus(node, group, upOf) {
    const serving = group.filter((d) => upOf[d.device_id] !== false).length;
    const state = serving === group.length ? "healthy" : serving > 0 ? "warning" : "critical";
    badge(node, state);
    node.classList.add("stage-group-status");
    node.textContent = state === "warning" ? "degraded" : state === "critical" ? "down" : "healthy";
    node.title = `${serving} of ${group.length} replicas serving`;
  }

  function renderDevices(snapshot, health) {
    const container = document.getElementById("devices");
    const statusOf = {};
    const upOf = {};
    for (const d of health.devices) {
      statusOf[d.device_id] = d.status;
      upOf[d.device_id] = d.up;
    }
    const devices = orderedDevices(snapshot);
    const groups = stageGroups(devices);
    const order = groups.map((g) => g.map((d) => d.device_id).join("+")).join("|");
    if (container.dataset.order !== order) {
      container.replaceChildren();
      groups.forEach((group, i) => {
        if (i > 0) {
          const arrow = el("div", "arrow", "→");
          const pairs = [];
          for (const from of groups[i - 1]) for (const to of group) pairs.push(`${from.device_id}→${to.device_id}`);
          arrow.dataset.link = pairs.join(",");
          container.appendChild(arrow);
        }
        let parent = container;
        if (group.length > 1) {
          const box = el("div", "stage-group");
          box.dataset.stage = String(group[0].stage);
          const head = el("div", "stage-group-head");
          head.appendChild(el("span", "stage-group-name", `stage ${group[0].stage} · ${group.length} replicas`));
          head.appendChild(el("span", "badge stage-group-status"));
          box.appendChild(head);
          container.appendChild(box);
          parent = box;
        }
        for (const device of group) {
          const parts = cards.get(device.device_id) || createCard(device.device_id);
          parent.appendChild(parts.card);
        }
      });
      container.dataset.order = order;
    }
    for (const box of container.querySelectorAll(".stage-group")) {
      const group = groups.find((g) => String(g[0].stage) === box.dataset.stage && g.length > 1);
      if (group) renderGroupStatus(box.querySelector(".stage-group-status"), group, upOf);
    }
    // Each arrow is the links that carry the pipeline's Forward calls between two stages:
    // coordinator → first worker (token ids), then worker → worker (hidden states).
    const links = {};
    for (const link of snapshot.network.links) links[`${link.device}→${link.peer}`] = link;
    for (const arrow of container.querySelectorAll(".arrow")) {
      const carried = arrow.dataset.link.split(",").map((pair) => [pair, links[pair]]);
      arrow.classList.toggle("carries", carried.some(([, link]) => link && link.transmit_bytes_total > 0));
      arrow.title = carried
        .map(([pair, link]) =>
          link
            ? `${pair}: ${fmt.bytes(link.transmit_bytes_total)} sent, ${fmt.bytes(link.receive_bytes_total)} received`
            : `${pair}: no traffic recorded yet`
        )
        .join("\n");
    }
    for (const device of devices) {
      updateCard(cards.get(device.device_id), device, snapshot, statusOf[device.device_id] || "unknown");
    }
  }

  window.RelayDevices = { renderDevices };
})();
