/* mlx-relay dashboard: the firing-alerts banner and the alerts panel, from each live update. */
"use strict";

(function () {
  const { fmt, el } = window.RelayUI;
  const SEVERITY_BADGE = { critical: "critical", warning: "warning", info: "unknown" };

  function alertRow(alert, when) {
    const row = el("tr", `alert-row alert-${alert.state}`);
    row.dataset.alertname = alert.alertname;
    const severity = el("td");
    const state = SEVERITY_BADGE[alert.severity] || "unknown";
    severity.appendChild(el("span", `badge badge-${state}`, alert.severity || "none"));
    row.appendChild(severity);
    row.appendChild(el("td", "alert-name", alert.alertname));
    row.appendChild(el("td", "alert-state", alert.state));
    const summary = el("td", "alert-summary", alert.annotations.summary || "");
    summary.title = alert.annotations.description || "";
    row.appendChild(summary);
    row.appendChild(el("td", "muted", when ? fmt.ago(when) : "–"));
    return row;
  }

  function renderPanel(view) {
    const body = document.querySelector("#alerts tbody");
    if (!body) return;
    body.replaceChildren();
    const rows = [
      ...view.firing.map((a) => alertRow(a, a.fired_at)),
      ...view.pending.map((a) => alertRow(a, a.active_at)),
      ...view.resolved.slice(0, 10).map((a) => alertRow(a, a.resolved_at)),
    ];
    if (!rows.length) {
      const empty = el("tr");
      const cell = el("td", "muted", view.enabled ? "no alerts" : "alerting is off");
      cell.colSpan = 5;
      empty.appendChild(cell);
      body.appendChild(empty);
    }
    rows.forEach((row) => body.appendChild(row));
    const note = document.getElementById("alerts-note");
    if (note) {
      note.textContent = view.enabled
        ? `${view.rules.length} rules, evaluated every ${fmt.seconds(view.evaluation_interval_seconds)}`
        : "";
    }
  }

  function renderBanner(view) {
    const banner = document.getElementById("alert-banner");
    if (!banner) return;
    const firing = view.firing;
    banner.classList.toggle("hidden", firing.length === 0);
    banner.classList.toggle("alert-banner-critical", firing.some((a) => a.severity === "critical"));
    banner.replaceChildren();
    if (!firing.length) return;
    banner.appendChild(el("strong", null, `${firing.length} firing: `));
    firing.slice(0, 3).forEach((alert, i) => {
      const item = el("span", "alert-banner-item", alert.annotations.summary || alert.alertname);
      item.dataset.alertname = alert.alertname;
      if (i) banner.appendChild(document.createTextNode(" · "));
      banner.appendChild(item);
    });
    if (firing.length > 3) banner.appendChild(document.createTextNode(` · and ${firing.length - 3} more`));
  }

  document.addEventListener("relay:update", (event) => {
    const view = event.detail.alerts;
    if (!view) return;
    renderBanner(view);
    renderPanel(view);
  });
})();
