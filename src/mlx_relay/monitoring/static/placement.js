/* mlx-relay dashboard: the placement panel, from GET /api/placement (coordinator only). */
"use strict";

(function () {
  const { fmt, el, setText } = window.RelayUI;
  const token = new URLSearchParams(window.location.search).get("token");
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const REFRESH_MS = 5000;

  function time(view, seconds) {
    return view.source === "measured" ? fmt.seconds(seconds) : `${seconds.toFixed(2)} layers`;
  }

  function splitRow(view, name, split) {
    const row = el("tr", `placement-${name}`);
    row.appendChild(el("td", null, name));
    const ranges = split.stages.map((s) => `${s.device_id} [${s.layer_start}, ${s.layer_end})`);
    row.appendChild(el("td", "placement-split", ranges.join(" · ")));
    const stages = split.stages.map((s) => time(view, s.predicted_seconds));
    row.appendChild(el("td", "muted", stages.join(" / ")));
    row.appendChild(el("td", "placement-step", time(view, split.predicted_step_seconds)));
    row.appendChild(el("td", null, time(view, split.predicted_latency_seconds)));
    return row;
  }

  function render(view) {
    const body = document.querySelector("#placement tbody");
    body.replaceChildren();
    for (const [name, split] of [["current", view.current], ["proposed", view.proposed]]) {
      if (split) body.appendChild(splitRow(view, name, split));
    }
    const gain = view.predicted_gain_ratio;
    setText(
      "placement-gain",
      view.error ? `no split proposed: ${view.error}`
        : gain === null ? "–" : `${gain >= 0 ? "+" : ""}${(gain * 100).toFixed(1)} %`,
    );
    setText(
      "placement-note",
      view.source === "measured" ? "from live stage timings" : "no timings yet: layer units",
    );
  }

  async function refresh() {
    const panel = document.getElementById("placement-panel");
    // Only the coordinator's app has the advisor; a standalone dashboard hides the panel.
    if (!panel || document.body.dataset.placement !== "1") return;
    try {
      const response = await fetch("/api/placement", { headers });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      panel.classList.remove("hidden");
      render(await response.json());
    } catch (error) {
      setText("placement-note", `unavailable: ${error.message}`);
    }
    window.setTimeout(refresh, REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", refresh);
})();
