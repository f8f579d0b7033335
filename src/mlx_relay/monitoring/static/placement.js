/* mlx-relay dashboard: the placement panel, from GET /api/placement (coordinator only), and
 * its "apply proposal" action (POST /api/placement/apply, behind the same bearer token). */
"use strict";

(function () {
  const { fmt, el, setText } = window.RelayUI;
  const token = new URLSearchParams(window.location.search).get("token");
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const REFRESH_MS = 5000;
  const FOLLOW_MS = 500;
  let applying = false;

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

  function ranges(split) {
    return split ? split.stages.map((s) => `${s.layer_start}:${s.layer_end}`).join(",") : "";
  }

  function splitText(pairs) {
    return (pairs || []).map(([a, b]) => `[${a}, ${b})`).join(" / ");
  }

  async function follow() {
    // Each step of the repartition the coordinator reports, until it ends.
    const response = await fetch("/api/placement/apply", { headers });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const status = await response.json();
    const last = status.progress.length ? status.progress[status.progress.length - 1] : null;
    if (status.state === "running") {
      setText("placement-apply-status", last ? `${last.phase}: ${last.detail}` : "starting");
      window.setTimeout(() => follow().catch(showError), FOLLOW_MS);
      return;
    }
    applying = false;
    setText(
      "placement-apply-status",
      status.state === "failed" ? `not applied: ${status.error}`
        : `applied ${splitText(status.after)} in ${fmt.seconds(status.total_seconds || 0)}`,
    );
    refresh(false);
  }

  function showError(error) {
    applying = false;
    setText("placement-apply-status", `not applied: ${error.message}`);
  }

  async function apply() {
    const button = document.getElementById("placement-apply");
    button.disabled = true;
    applying = true;
    setText("placement-apply-status", "starting");
    try {
      const response = await fetch("/api/placement/apply", {
        method: "POST",
        headers: { ...headers, "Content-Type": "application/json" },
        body: "{}",
      });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        throw new Error(body.detail || `HTTP ${response.status}`);
      }
      await follow();
    } catch (error) {
      showError(error);
    }
  }

  function render(view) {
    const button = document.getElementById("placement-apply");
    const movable = view.proposed && view.current && ranges(view.proposed) !== ranges(view.current);
    button.disabled = applying || !movable;
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

  async function refresh(again = true) {
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
    if (again) window.setTimeout(refresh, REFRESH_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    const button = document.getElementById("placement-apply");
    if (button) button.addEventListener("click", apply);
    refresh();
  });
})();
