"use strict";
(function () {
  const POLL_MS = 1000;
  const TIMEOUT_MS = 4000;
  const DASH = "–";
  const STATS_URL = "v1/stats";

  let lastSnapshot = null;
  let lastOk = 0;

  const $ = (id) => document.getElementById(id);
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const obj = (v) => (v !== null && typeof v === "object" ? v : {});
  const arr = (v) => (Array.isArray(v) ? v : []);

  // ---- formatting -------------------------------------------------------------------------
  function fixed(v, digits) {
    if (!isNum(v)) return DASH;
    return v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }
  function int(v) {
    return isNum(v) ? Math.round(v).toLocaleString("en-US") : DASH;
  }
  function ms(v) {
    if (!isNum(v)) return DASH;
    const a = Math.abs(v);
    return a < 10 ? fixed(v, 2) : a < 100 ? fixed(v, 1) : int(v);
  }
  // A rate in [0, 1] as a percentage number, without the sign.
  function pct(v) {
    if (!isNum(v)) return DASH;
    const p = v * 100;
    return p !== 0 && Math.abs(p) < 0.1 ? fixed(p, 3) : fixed(p, 1);
  }
  function usd(v) {
    if (!isNum(v)) return DASH;
    const a = Math.abs(v);
    if (a === 0) return "0.00";
    if (a >= 1) return fixed(v, 2);
    if (a >= 0.001) return fixed(v, 4);
    if (a >= 0.000001) return fixed(v, 6);
    return v.toExponential(2);
  }
  function compact(v) {
    if (!isNum(v)) return DASH;
    const a = Math.abs(v);
    if (a < 1e4) return int(v);
    if (a < 1e6) return fixed(v / 1e3, 1) + "k";
    if (a < 1e9) return fixed(v / 1e6, 2) + "M";
    return fixed(v / 1e9, 2) + "G";
  }
  function clock(t) {
    return isNum(t) ? new Date(t).toLocaleTimeString("en-GB") : DASH;
  }
  function ago(t, now) {
    if (!isNum(t) || !isNum(now)) return DASH;
    const s = Math.max(0, (now - t) / 1000);
    if (s < 1) return "now";
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }
  function tokensOf(f) {
    const t = obj(f.tokens_total);
    const p = isNum(t.prompt) ? t.prompt : null;
    const c = isNum(t.completion) ? t.completion : null;
    return { prompt: p, completion: c, total: p === null && c === null ? null : (p || 0) + (c || 0) };
  }

  // ---- DOM helpers ------------------------------------------------------------------------
  function setText(id, text) {
    const e = $(id);
    if (e && e.textContent !== text) e.textContent = text;
  }
  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }
  function emptyRow(colspan, text) {
    const tr = document.createElement("tr");
    tr.className = "empty";
    const td = cell(text);
    td.colSpan = colspan;
    tr.appendChild(td);
    return tr;
  }

  // ---- rendering --------------------------------------------------------------------------
  function renderTiles(s) {
    const f = obj(s.fleet);
    const e2e = obj(f.end_to_end_ms);
    setText("window", isNum(s.window_s) ? String(s.window_s) : DASH);
    setText("generated", clock(s.generated_at));
    setText("throughput", fixed(f.throughput_per_s, 1));
    setText("completed", int(f.completed_total));
    setText(
      "completed-sub",
      `${int(f.succeeded_total)} ok · ${int(f.failed_total)} failed · ${int(f.dead_total)} dead · ` +
        `${int(f.cancelled_total)} cancelled`,
    );
    setText("p50", ms(e2e.p50));
    setText("p95", ms(e2e.p95));
    setText("p99", ms(e2e.p99));
    setText("max", ms(e2e.max));
    setText("e2e-count", int(e2e.count));
    setText("error-rate", pct(f.error_rate));
    $("error-tile").classList.toggle("bad", isNum(f.error_rate) && f.error_rate > 0);
    setText("retry-rate", pct(f.retry_rate));
    setText("retries", int(f.retries_total));
    setText("cache-hit-rate", pct(f.cache_hit_rate));
    setText("cache-hits", int(f.cache_hits_total));
    setText("cost", usd(f.cost_usd_total));
    setText("cost-per-task", usd(f.cost_per_task_usd));
    setText("saved", usd(f.saved_usd_total));
    const tok = tokensOf(f);
    setText("tokens", compact(tok.total));
    setText("tokens-sub", `${compact(tok.prompt)} prompt · ${compact(tok.completion)} completion`);
    setText("workers", int(f.workers));
    setText("utilization", pct(f.utilization));
    setText("in-flight", int(f.in_flight));
    setText("capacity", int(f.capacity));

    const stages = [["wait", f.queue_wait_ms], ["run", f.run_ms], ["e2e", f.end_to_end_ms]];
    for (const [name, h] of stages) {
      const d = obj(h);
      setText(name === "e2e" ? "e2e-count2" : `${name}-count`, int(d.count));
      for (const q of ["p50", "p95", "p99", "max"]) setText(`${name}-${q}`, ms(d[q]));
    }
  }

  function renderSeries(s) {
    const rows = arr(s.series).slice();
    rows.sort((a, b) =>
      String(a.queue).localeCompare(String(b.queue)) ||
      String(a.kind).localeCompare(String(b.kind)) ||
      String(a.priority).localeCompare(String(b.priority)));
    const body = document.createElement("tbody");
    body.id = "series-rows";
    for (const raw of rows) {
      const r = obj(raw);
      const tr = document.createElement("tr");
      tr.dataset.series = `${r.queue}/${r.kind}/${r.priority}`;
      const e2e = obj(r.end_to_end_ms);
      tr.append(
        cell(String(r.queue ?? DASH), "l"),
        cell(String(r.kind ?? DASH), "l"),
        cell(String(r.priority ?? DASH), "l"),
        cell(fixed(r.throughput_per_s, 1)),
        cell(int(r.completed_total)),
        cell(int(r.failed_total), isNum(r.failed_total) && r.failed_total > 0 ? "bad" : ""),
        cell(int(r.dead_total), isNum(r.dead_total) && r.dead_total > 0 ? "bad" : ""),
        cell(pct(r.error_rate), isNum(r.error_rate) && r.error_rate > 0 ? "bad" : ""),
        cell(pct(r.retry_rate)),
        cell(pct(r.cache_hit_rate)),
        cell(ms(obj(r.queue_wait_ms).p95)),
        cell(ms(obj(r.run_ms).p95)),
        cell(ms(e2e.p50)),
        cell(ms(e2e.p95)),
        cell(ms(e2e.p99)),
        cell(compact(tokensOf(r).total)),
        cell(usd(r.cost_usd_total)),
      );
      body.appendChild(tr);
    }
    if (!rows.length) body.appendChild(emptyRow(17, "no tasks seen yet"));
    $("series-rows").replaceWith(body);
  }

  function renderRuns(s) {
    const rows = arr(s.runs).map(obj);
    const body = document.createElement("tbody");
    body.id = "runs-rows";
    const bad = (v) => (isNum(v) && v > 0 ? "bad" : "");
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.dataset.run = String(r.name ?? "");
      const d = obj(r.duration_ms);
      const ended = [r.succeeded_total, r.failed_total, r.cancelled_total].reduce((a, v) => a + (isNum(v) ? v : 0), 0);
      tr.append(
        cell(String(r.name ?? DASH), "l"),
        cell(int(r.running)),
        cell(int(r.started)),
        cell(int(r.succeeded)),
        cell(int(r.failed), bad(r.failed)),
        cell(int(r.cancelled)),
        cell(int(r.started_total)),
        cell(int(ended)),
        cell(ms(d.p50)),
        cell(ms(d.p95)),
        cell(compact(tokensOf(r).total)),
        cell(usd(r.cost_usd_total)),
        cell(usd(r.cost_per_run_usd)),
        cell(usd(r.saved_usd_total)),
      );
      body.appendChild(tr);
    }
    if (!rows.length) body.appendChild(emptyRow(14, "no runs seen yet"));
    $("runs-rows").replaceWith(body);
  }

  function renderWorkers(s) {
    const rows = arr(s.workers).slice();
    rows.sort((a, b) => String(obj(a).id).localeCompare(String(obj(b).id)));
    const body = document.createElement("tbody");
    body.id = "workers-rows";
    for (const raw of rows) {
      const w = obj(raw);
      const tr = document.createElement("tr");
      tr.dataset.worker = String(w.id ?? "");
      const inFlight = document.createElement("td");
      inFlight.textContent = `${int(w.in_flight)} / ${int(w.max_concurrent)}`;
      if (isNum(w.in_flight) && isNum(w.max_concurrent) && w.max_concurrent > 0) {
        const bar = document.createElement("span");
        bar.className = "bar";
        const fill = document.createElement("i");
        fill.style.width = `${Math.min(100, (100 * w.in_flight) / w.max_concurrent)}%`;
        bar.appendChild(fill);
        inFlight.appendChild(bar);
      }
      tr.append(
        cell(String(w.id ?? DASH), "l"),
        cell(arr(w.queues).join(", ") || DASH, "l"),
        inFlight,
        cell(fixed(w.cpu_percent, 1)),
        cell(isNum(w.rss_bytes) ? fixed(w.rss_bytes / 1048576, 1) : DASH),
        cell(fixed(w.memory_percent, 1)),
        cell(ago(w.last_seen_ms, s.generated_at)),
      );
      body.appendChild(tr);
    }
    if (!rows.length) body.appendChild(emptyRow(7, "no workers seen"));
    $("workers-rows").replaceWith(body);
  }

  function renderAlerts(s) {
    const alerts = arr(s.alerts).map(obj);
    // Firing first, then newest first.
    alerts.sort((a, b) =>
      (a.state === "firing" ? 0 : 1) - (b.state === "firing" ? 0 : 1) ||
      (isNum(b.since) ? b.since : 0) - (isNum(a.since) ? a.since : 0));
    const list = document.createElement("ul");
    list.id = "alerts";
    let firing = 0;
    for (const a of alerts) {
      const li = document.createElement("li");
      const isFiring = a.state === "firing";
      if (isFiring) firing += 1;
      li.className = isFiring ? "firing" : "resolved";
      li.dataset.rule = String(a.rule ?? "");
      const when = document.createElement("span");
      when.className = "when";
      when.textContent = `since ${clock(a.since)}`;
      const state = document.createElement("span");
      state.className = "state";
      state.textContent = isFiring ? "FIRING" : "resolved";
      const text = document.createElement("div");
      const rule = String(a.rule ?? "alert");
      const message = a.message
        ? String(a.message)
        : `${a.metric ?? "value"} ${fixed(a.value, 2)} ${a.op ?? ""} ${fixed(a.threshold, 2)}`;
      text.textContent = message.startsWith(rule) ? message : `${rule}: ${message}`;
      li.append(when, state, text);
      list.appendChild(li);
    }
    if (!alerts.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "no alerts";
      list.appendChild(li);
    }
    $("alerts").replaceWith(list);
    setText("alerts-firing", String(firing));
  }

  // ---- charts -----------------------------------------------------------------------------
  const CHARTS = [
    { id: "chart-throughput", key: "throughput_per_s", fmt: (v) => fixed(v, 1) + "/s" },
    { id: "chart-p95", key: "p95_ms", fmt: (v) => ms(v) + " ms" },
    { id: "chart-error-rate", key: "error_rate", fmt: (v) => pct(v) + " %", axis: (v) => pct(v) + "%" },
    { id: "chart-cache-hit-rate", key: "cache_hit_rate", fmt: (v) => pct(v) + " %", axis: (v) => pct(v) + "%", max: 1 },
    { id: "chart-cost", key: "cost_usd", fmt: (v) => "$" + usd(v), axis: (v) => "$" + (v >= 0.01 ? fixed(v, 2) : usd(v)) },
    { id: "chart-workers", key: "workers", fmt: (v) => int(v), integer: true },
  ];

  function niceMax(v, integer) {
    if (!(v > 0)) return integer ? 2 : 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) {
      const n = m * p;
      // Integer charts get an even maximum so the middle grid line is an integer too.
      if (n >= v) return integer ? Math.max(2, 2 * Math.ceil(n / 2)) : n;
    }
    return 10 * p;
  }

  function drawChart(spec, history) {
    const canvas = $(spec.id);
    if (!canvas || !canvas.getContext) return;
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim() || "#888";
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, canvas.clientWidth);
    const h = Math.max(40, canvas.clientHeight);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.font = "11px system-ui, 'DejaVu Sans', sans-serif";

    const pts = history
      .map((p) => ({ t: obj(p).t, v: obj(p)[spec.key] }))
      .filter((p) => isNum(p.t))
      .map((p) => ({ t: p.t, v: isNum(p.v) ? p.v : null }));
    const values = pts.filter((p) => p.v !== null).map((p) => p.v);
    const latest = [...pts].reverse().find((p) => p.v !== null);
    setText(spec.id + "-now", latest ? spec.fmt(latest.v) : DASH);

    const left = 52, right = 6, top = 6, bottom = 16;
    const pw = w - left - right, ph = h - top - bottom;
    const axisFmt = spec.axis || spec.fmt;
    const ymax = spec.max !== undefined ? spec.max : niceMax(values.length ? Math.max(...values) : 0, spec.integer);

    // Grid and y labels.
    ctx.strokeStyle = color("--grid");
    ctx.fillStyle = color("--muted");
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 2; i++) {
      const y = top + ph - (ph * i) / 2;
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y) + 0.5);
      ctx.lineTo(w - right, Math.round(y) + 0.5);
      ctx.stroke();
      ctx.fillText(axisFmt((ymax * i) / 2), left - 4, y);
    }
    if (!pts.length || !values.length) {
      ctx.textAlign = "center";
      ctx.fillText("waiting for data", left + pw / 2, top + ph / 2);
      return;
    }

    const t0 = pts[0].t, t1 = pts[pts.length - 1].t;
    const span = Math.max(1, t1 - t0);
    const x = (t) => (pts.length === 1 ? left + pw : left + ((t - t0) / span) * pw);
    const y = (v) => top + ph - (Math.min(Math.max(v, 0), ymax) / ymax) * ph;

    // Time labels: the oldest point's age and "now".
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    const ageMin = (t1 - t0) / 60000;
    if (t1 > t0) ctx.fillText(ageMin >= 1 ? `-${Math.round(ageMin)} min` : `-${Math.round((t1 - t0) / 1000)} s`, left, h - 3);
    ctx.textAlign = "right";
    ctx.fillText(clock(t1), w - right, h - 3);

    // Runs of consecutive non-null points; a null breaks the line.
    const runs = [];
    let run = [];
    for (const p of pts) {
      if (p.v === null) {
        if (run.length) runs.push(run);
        run = [];
      } else {
        run.push(p);
      }
    }
    if (run.length) runs.push(run);

    const accent = color("--accent");
    for (const r of runs) {
      ctx.beginPath();
      r.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p.v)) : ctx.moveTo(x(p.t), y(p.v))));
      ctx.strokeStyle = accent;
      ctx.lineWidth = 1.5;
      ctx.stroke();
      if (r.length > 1) {
        ctx.lineTo(x(r[r.length - 1].t), top + ph);
        ctx.lineTo(x(r[0].t), top + ph);
        ctx.closePath();
        ctx.globalAlpha = 0.12;
        ctx.fillStyle = accent;
        ctx.fill();
        ctx.globalAlpha = 1;
      } else {
        ctx.fillStyle = accent;
        ctx.beginPath();
        ctx.arc(x(r[0].t), y(r[0].v), 2, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }

  function renderCharts(s) {
    const history = arr(s.history);
    // History points hold the spend of their interval: name the interval.
    const ts = history.map((p) => obj(p).t).filter(isNum);
    if (ts.length > 1) {
      const step = Math.round((ts[ts.length - 1] - ts[0]) / (ts.length - 1) / 1000);
      if (step > 0) setText("chart-cost-label", `Cost (USD per ${step} s)`);
    }
    for (const spec of CHARTS) drawChart(spec, history);
  }

  // ---- polling ----------------------------------------------------------------------------
  function setState(state, message) {
    document.body.dataset.state = state;
    const banner = $("banner");
    banner.textContent = message || "";
    banner.classList.toggle("show", Boolean(message));
  }

  function render(s) {
    if (!s || typeof s !== "object" || !s.fleet || typeof s.fleet !== "object") {
      throw new Error("the stats have no `fleet` figures");
    }
    renderTiles(s);
    renderSeries(s);
    renderRuns(s);
    renderWorkers(s);
    renderAlerts(s);
    renderCharts(s);
    lastSnapshot = s;
    lastOk = Date.now();
    setText("status", "live");
    document.body.dataset.updated = String(s.generated_at);
  }

  async function poll() {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), TIMEOUT_MS);
    let snapshot = null;
    try {
      const resp = await fetch(STATS_URL, { cache: "no-store", signal: ctrl.signal, headers: { Accept: "application/json" } });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      snapshot = await resp.json();
    } catch (e) {
      const since = lastOk ? ` (last update ${Math.round((Date.now() - lastOk) / 1000)} s ago)` : "";
      setState("unreachable", `aggregator unreachable: ${e && e.name === "AbortError" ? "timed out" : e.message}${since}; retrying…`);
      setText("status", "unreachable");
    } finally {
      clearTimeout(timer);
    }
    if (snapshot !== null) {
      try {
        render(snapshot);
        setState("ok", "");
      } catch (e) {
        setState("invalid", `unexpected answer from the aggregator: ${e.message}`);
        setText("status", "invalid data");
      }
    }
    setTimeout(poll, POLL_MS);
  }

  let resizeTimer = 0;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => lastSnapshot && renderCharts(lastSnapshot), 100);
  });

  poll();
})();
