/* mlx-relay dashboard: one request's waterfall, from GET /api/requests/{id}/trace.
 *
 * Opened from a row of the "Recent requests" table. One lane per entry of the trace's
 * "lanes" (the coordinator, then each link and the stage it leads to, in pipeline order),
 * every span a bar on a shared time axis from the request's arrival (nested spans of a lane
 * one row below their parent), its name, duration and attributes on hover; the time
 * attribution bar above; a download of the same trace as Chrome trace-event JSON.
 */
"use strict";

(function () {
  const { fmt, el, token, authHeaders, getJson } = window.RelayUI;
  const { render: renderAttribution, tones: attributionTones } = window.RelayAttribution;
  const MAX_SPANS_DRAWN = 8000; // beyond this the longest are drawn; the download has all
  const WAIT_SPANS = new Set(["admission wait", "queue wait", "wait for the step before"]);
  const COMPUTE_SPANS = new Set(["compute", "encode", "sample"]);
  const HOVER_HINT = "hover a span for its name, duration and attributes";

  const view = { requestId: null, sequence: 0 };

  function node(id) {
    return document.getElementById(id);
  }

  function traceUrl(requestId, format) {
    const path = `/api/requests/${encodeURIComponent(requestId)}/trace`;
    return format ? `${path}?format=${format}` : path;
  }

  // ---- the time axis ------------------------------------------------------------------------

  /** Tick times (seconds) over [0, end]: a 1-2-5 step giving about six ticks. */
  function ticks(end) {
    if (!(end > 0)) return [0];
    const rough = end / 6;
    const magnitude = 10 ** Math.floor(Math.log10(rough));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= rough);
    const out = [];
    for (let t = 0; t <= end + step * 1e-9; t += step) out.push(t);
    return out;
  }

  function percentOf(seconds, end) {
    return `${((100 * seconds) / end).toFixed(3)}%`;
  }

  function axis(end) {
    const row = el("div", "lane lane-axis");
    row.appendChild(el("div", "lane-label muted", "time from arrival"));
    const track = el("div", "lane-track");
    for (const t of ticks(end)) {
      const tick = el("span", "tick", fmt.seconds(t));
      tick.style.left = percentOf(t, end);
      track.appendChild(tick);
    }
    row.appendChild(track);
    return row;
  }

  // ---- spans -------------------------------------------------------------------------------

  /** Each span's row inside its lane: how many of its ancestors share its lane. */
  function depths(spans) {
    const byId = new Map(spans.map((s) => [s.span_id, s]));
    const memo = new Map();
    function depth(span) {
      if (memo.has(span.span_id)) return memo.get(span.span_id);
      memo.set(span.span_id, 0); // a cycle (never expected) ends here
      const parent = span.parent_id ? byId.get(span.parent_id) : undefined;
      const d = parent && parent.lane === span.lane ? depth(parent) + 1 : 0;
      memo.set(span.span_id, d);
      return d;
    }
    for (const s of spans) depth(s);
    return memo;
  }

  /** The bar's classes: what kind of time it is, coloured as its attribution part. */
  function spanClass(span, tone) {
    if (!span.parent_id) return "span span-root";
    if (WAIT_SPANS.has(span.name)) return "span span-wait";
    if (span.lane.startsWith("link ")) return `span span-network tone-${tone.network[span.lane.slice(5)] || 0}`;
    const stage = /^stage (\d+)/.exec(span.lane);
    if (stage) {
      const kind = COMPUTE_SPANS.has(span.name) ? "span-compute" : "span-call";
      return `span ${kind} tone-${Number(stage[1]) % 6}`;
    }
    return "span span-coordinator";
  }

  function describe(span) {
    const lines = [
      `${span.name} · ${fmt.seconds(span.duration_s)}`,
      `${span.lane}, from ${fmt.seconds(span.start_s)} to ${fmt.seconds(span.start_s + span.duration_s)}`,
    ];
    for (const [key, value] of Object.entries(span.attributes || {})) {
      lines.push(`${key}: ${Array.isArray(value) ? value.join(", ") : value}`);
    }
    return lines.join("\n");
  }

  /** The spans to draw: all of them, or the longest MAX_SPANS_DRAWN. */
  function drawn(spans) {
    if (spans.length <= MAX_SPANS_DRAWN) return spans;
    return [...spans].sort((a, b) => b.duration_s - a.duration_s).slice(0, MAX_SPANS_DRAWN);
  }

  function lanes(doc) {
    const root = node("waterfall-lanes");
    root.replaceChildren();
    const names = [...doc.lanes];
    for (const s of doc.spans) if (!names.includes(s.lane)) names.push(s.lane);
    const end = Math.max(doc.duration_s, ...doc.spans.map((s) => s.start_s + s.duration_s)) || 1e-6;
    const depth = depths(doc.spans);
    const tone = attributionTones(doc.attribution);
    const byLane = new Map(names.map((n) => [n, []]));
    const shown = drawn(doc.spans);
    for (const s of shown) byLane.get(s.lane).push(s);

    root.appendChild(axis(end));
    for (const name of names) {
      const row = el("div", "lane");
      row.dataset.lane = name;
      const kind = name === "coordinator" ? "coordinator" : name.startsWith("link ") ? "link" : "stage";
      row.dataset.kind = kind;
      row.appendChild(el("div", `lane-label lane-label-${kind}`, name));
      const track = el("div", "lane-track");
      const spans = byLane.get(name);
      const rows = 1 + Math.max(0, ...spans.map((s) => depth.get(s.span_id)));
      track.classList.add(`rows-${Math.min(rows, 4)}`);
      for (const s of spans) {
        const bar = el("span", spanClass(s, tone));
        bar.dataset.name = s.name;
        bar.dataset.spanId = s.span_id;
        bar.dataset.start = String(s.start_s);
        bar.dataset.duration = String(s.duration_s);
        bar.classList.add(`depth-${Math.min(depth.get(s.span_id), 3)}`);
        bar.style.left = percentOf(s.start_s, end);
        bar.style.width = percentOf(s.duration_s, end);
        bar.title = describe(s);
        track.appendChild(bar);
      }
      row.appendChild(track);
      root.appendChild(row);
    }
    root.dataset.lanes = String(names.length);
    return shown.length;
  }

  // ---- the panel ---------------------------------------------------------------------------

  function showMessage(text, kind) {
    const message = node("waterfall-message");
    message.textContent = text;
    message.className = `waterfall-message ${kind || "muted"}`;
  }

  function reset(requestId) {
    const panel = node("waterfall");
    panel.classList.remove("hidden");
    panel.dataset.requestId = requestId;
    panel.dataset.state = "loading";
    node("waterfall-id").textContent = requestId;
    node("waterfall-meta").textContent = "";
    node("waterfall-attribution").replaceChildren();
    node("waterfall-lanes").replaceChildren();
    node("waterfall-hover").textContent = HOVER_HINT;
    const link = node("waterfall-download");
    link.href = traceUrl(requestId, "chrome");
    link.download = `trace-${requestId.replace(/[^A-Za-z0-9_.-]/g, "_").slice(0, 64)}.json`;
    link.classList.add("hidden");
    showMessage("loading the trace…");
  }

  function showTrace(doc) {
    const panel = node("waterfall");
    const meta = [doc.model, doc.status, `${fmt.count(doc.prompt_tokens)} prompt / ${fmt.count(doc.output_tokens)} output tokens`, `arrived ${fmt.clock(doc.start_unix)}`];
    node("waterfall-meta").textContent = meta.filter(Boolean).join(" · ");
    renderAttribution(node("waterfall-attribution"), doc.attribution, "request");
    const count = lanes(doc);
    node("waterfall-download").classList.remove("hidden");
    if (!doc.spans_kept) {
      showMessage("its spans are no longer kept (only the newest tracing.max_traces traces keep theirs): the attribution is the history store's summary");
    } else if (count < doc.spans.length) {
      showMessage(`showing the ${fmt.count(count)} longest of ${fmt.count(doc.spans.length)} spans; the Chrome trace has them all`);
    } else {
      showMessage(`${fmt.count(doc.spans.length)} spans on ${doc.lanes.length} lanes`);
    }
    panel.dataset.state = doc.spans_kept ? "ready" : "summary";
  }

  function showFailure(err) {
    const panel = node("waterfall");
    if (err.status === 404) {
      const why = err.detail && err.detail.message ? err.detail.message : "not found";
      showMessage(`No stored trace: ${why}.`, "waterfall-missing");
      node("waterfall-hover").textContent = "";
      panel.dataset.state = "missing";
    } else {
      showMessage(`The trace could not be loaded: ${err.message}`, "error-text");
      panel.dataset.state = "error";
    }
  }

  function markSelected() {
    for (const row of document.querySelectorAll("#requests tbody tr[data-request-id]")) {
      row.classList.toggle("selected", row.dataset.requestId === view.requestId);
    }
  }

  /** Open the waterfall of ``requestId`` (a later call wins over one still loading). */
  async function open(requestId) {
    const sequence = ++view.sequence;
    view.requestId = requestId;
    markSelected();
    reset(requestId);
    const panel = node("waterfall");
    if (document.body.dataset.traces !== "1") {
      showMessage("No stored trace: tracing is off on this coordinator (tracing.enabled in the cluster file).", "waterfall-missing");
      node("waterfall-hover").textContent = "";
      panel.dataset.state = "missing";
      return;
    }
    panel.scrollIntoView({ block: "nearest" });
    try {
      const doc = await getJson(traceUrl(requestId));
      if (sequence === view.sequence) showTrace(doc);
    } catch (err) {
      if (sequence === view.sequence) showFailure(err);
    }
  }

  function close() {
    view.sequence++;
    view.requestId = null;
    node("waterfall").classList.add("hidden");
    markSelected();
  }

  // With a token the download goes through fetch (the token travels in a header, never in
  // an /api URL) and is saved from what came back.
  async function download(event) {
    if (!token) return;
    event.preventDefault();
    const link = event.currentTarget;
    try {
      const response = await fetch(link.getAttribute("href"), { headers: authHeaders });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const url = URL.createObjectURL(new Blob([await response.text()], { type: "application/json" }));
      const save = el("a");
      save.href = url;
      save.download = link.download;
      document.body.appendChild(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (err) {
      showMessage(`The Chrome trace could not be downloaded: ${err.message}`, "error-text");
    }
  }

  function init() {
    node("waterfall-close").addEventListener("click", close);
    node("waterfall-download").addEventListener("click", download);
    node("waterfall-lanes").addEventListener("mouseover", (event) => {
      const bar = event.target.closest(".span");
      node("waterfall-hover").textContent = bar ? bar.title.replace(/\n/g, " · ") : HOVER_HINT;
    });
  }

  init();
  window.RelayWaterfall = { open, close, markSelected, view };
})();
