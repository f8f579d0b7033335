/* mlx-relay dashboard: the time attribution bar (where a request's end-to-end time went:
 * queue, coordinator, compute per stage, network per link, bubble), and the "where a token's
 * time goes" panel over recent requests (GET /api/profile).
 *
 * An attribution is the API's {e2e_s, queue_s, coordinator_s, compute_s: {worker: s},
 * network_s: {"a → b": s}, bubble_s, residual_s}; docs/monitoring-api.md, "Traces".
 */
"use strict";

(function () {
  const { fmt, el, getJson } = window.RelayUI;
  const TONES = 6; // CSS classes tone-0 … tone-5 per kind
  const PROFILE_REFRESH_MS = 10000;

  /** The parts in display order, each {key, kind, label, seconds, tone}; stages and links
   * keep the API's (pipeline) order. */
  function parts(attribution) {
    const out = [
      { key: "queue", kind: "queue", label: "queue", seconds: attribution.queue_s, tone: 0 },
      { key: "coordinator", kind: "coordinator", label: "coordinator", seconds: attribution.coordinator_s, tone: 0 },
    ];
    Object.entries(attribution.compute_s || {}).forEach(([worker, s], i) => {
      out.push({ key: `compute ${worker}`, kind: "compute", label: `compute ${worker}`, seconds: s, tone: i % TONES });
    });
    Object.entries(attribution.network_s || {}).forEach(([link, s], i) => {
      out.push({ key: `network ${link}`, kind: "network", label: `network ${link}`, seconds: s, tone: i % TONES });
    });
    out.push({ key: "bubble", kind: "bubble", label: "bubble", seconds: attribution.bubble_s, tone: 0 });
    return out;
  }

  /** The tone (colour index) of each stage's compute and each link's network, by name. */
  function tones(attribution) {
    const compute = {};
    const network = {};
    Object.keys(attribution.compute_s || {}).forEach((worker, i) => (compute[worker] = i % TONES));
    Object.keys(attribution.network_s || {}).forEach((link, i) => (network[link] = i % TONES));
    return { compute, network };
  }

  /** Draw ``attribution`` into ``root`` (emptied first): a one-line head with the e2e time,
   * the bar (each part as wide as its share of e2e) and a legend with seconds and shares.
   * ``unit`` names what e2e is ("request", "token"). */
  function render(root, attribution, unit) {
    root.replaceChildren();
    const e2e = attribution.e2e_s;
    const all = parts(attribution);
    const accounted = all.reduce((sum, p) => sum + p.seconds, 0);
    const scale = Math.max(e2e, accounted) || 1;

    const head = el("div", "attribution-head");
    head.appendChild(el("span", "muted", unit === "token" ? "per output token " : "end-to-end "));
    const total = el("strong", "attribution-e2e", fmt.seconds(e2e));
    total.dataset.seconds = String(e2e);
    head.appendChild(total);
    const residual = attribution.residual_s === undefined ? e2e - accounted : attribution.residual_s;
    if (e2e > 0 && Math.abs(residual) >= 0.0005 * e2e) {
      const note = el("span", "muted attribution-residual", ` · unattributed ${fmt.seconds(residual)} (${fmt.percent(residual / e2e)})`);
      note.title = "the part of end-to-end time no measured part covers";
      head.appendChild(note);
    }
    root.appendChild(head);

    const bar = el("div", "attribution-bar");
    const legend = el("ul", "attribution-legend");
    for (const p of all) {
      const share = e2e > 0 ? p.seconds / e2e : 0;
      const text = `${p.label}: ${fmt.seconds(p.seconds)} (${fmt.percent(share)})`;
      const part = el("span", `part part-${p.kind} tone-${p.tone}`);
      part.dataset.part = p.key;
      part.dataset.seconds = String(p.seconds);
      part.style.width = `${((100 * Math.max(0, p.seconds)) / scale).toFixed(3)}%`;
      part.title = text;
      bar.appendChild(part);

      const item = el("li", "legend-item");
      item.dataset.part = p.key;
      item.title = text;
      item.appendChild(el("span", `swatch part-${p.kind} tone-${p.tone}`));
      item.appendChild(el("span", "legend-label", p.label));
      item.appendChild(el("span", "legend-seconds", fmt.seconds(p.seconds)));
      item.appendChild(el("span", "legend-share muted", fmt.percent(share)));
      legend.appendChild(item);
    }
    root.appendChild(bar);
    root.appendChild(legend);
  }

  // ---- where a token's time goes: /api/profile ---------------------------------------------

  const profile = { window: "300", timer: null };

  async function loadProfile() {
    const panel = document.getElementById("profile-panel");
    const root = document.getElementById("profile-attribution");
    const note = document.getElementById("profile-note");
    let data;
    try {
      data = await getJson("/api/profile", { window: profile.window });
    } catch (err) {
      console.warn("mlx-relay: profile unavailable", err);
      return;
    }
    panel.dataset.requests = String(data.requests);
    note.textContent = `${fmt.count(data.requests)} requests · ${fmt.count(data.output_tokens)} output tokens`;
    if (!data.per_output_token) {
      root.replaceChildren(el("p", "muted", "no request with output tokens finished in this window"));
      return;
    }
    render(root, data.per_output_token, "token");
    panel.dataset.ready = "1";
  }

  function startProfile() {
    if (document.body.dataset.traces !== "1") return;
    document.getElementById("profile-panel").classList.remove("hidden");
    document.getElementById("profile-window").addEventListener("change", (event) => {
      profile.window = event.target.value;
      loadProfile();
    });
    loadProfile();
    profile.timer = setInterval(loadProfile, PROFILE_REFRESH_MS);
  }

  window.RelayAttribution = { parts, tones, render, startProfile, loadProfile };
})();
