// The live dashboard: polls the API's JSON routes and draws them with uPlot.
// History is fetched incrementally (since_step = the next step not yet seen), every metric of
// each new row, so per-source series (`<metric>/src:<source>`, a run whose prompts come from two
// sources or more) are found as they appear; queue depths are not in the per-step history, so
// the page samples them itself at every poll.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const INTERVAL_MS = Math.max(200, Number(params.get("interval")) || 2000);
  const PAGE = 1000;
  const QUEUE_POINTS = 600; // samples of queue depth kept in the page
  const HISTORY_NAMES = [
    "heldout_accuracy", "reward_mean", "samples_kept", "samples_before", "tokens_kept",
    "tokens_valid", "sample_ratio", "token_ratio", "staleness_mean", "staleness_max",
    "token_staleness_mean", "loss",
  ];
  // Per-source metrics drawn as one line per source: held-out accuracy (greedy, else pass@1, as
  // heldout_accuracy is) and the training reward.
  const SOURCE_MARK = "/src:";
  const ACCURACY_BY_SOURCE = ["eval/greedy_accuracy", "eval/pass@1"];
  const REWARD_BY_SOURCE = "reward_mean";
  const PER_SOURCE = [...ACCURACY_BY_SOURCE, REWARD_BY_SOURCE].map((m) => m + SOURCE_MARK);

  const history = { steps: [], cols: Object.fromEntries(HISTORY_NAMES.map((n) => [n, []])) };
  let nextSince = 0;
  const queues = { t: [], groups: [], batches: [], dead: [] };

  // ---- charts -------------------------------------------------------------------------------

  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

  function series(label, i, opts) {
    return Object.assign({ label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: true, size: 4 } }, opts || {});
  }

  const charts = {};

  function makeChart(id, labels, opts) {
    const prev = charts[id];
    if (prev) prev.chart.destroy(); // redrawn with more lines: a source appeared
    const el = document.getElementById(id);
    const o = opts || {};
    const s = [{ label: o.time ? "time" : "step" }].concat(
      labels.map((l, i) => series(l, i, (o.dashed || []).includes(l) ? { dash: [6, 4], width: 1.5, points: { show: false } } : null)));
    const chart = new uPlot({
      width: Math.max(300, el.clientWidth),
      height: 220,
      scales: { x: { time: !!o.time }, y: o.y01 ? { range: [0, 1] } : { auto: true } },
      axes: [{ label: o.time ? "" : "step" }, {}],
      legend: { live: false },
      series: s,
    }, [[]].concat(labels.map(() => [])), el);
    charts[id] = { chart, el, labels, opts: o };
    el.dataset.series = JSON.stringify(labels);
  }

  // Lines whose set can grow (per source): the chart is made again when its labels change.
  function setLines(id, labels, x, ys) {
    const c = charts[id];
    if (c.labels.join("\n") !== labels.join("\n")) makeChart(id, labels, c.opts);
    setChart(id, x, ys);
  }

  function setChart(id, x, ys) {
    const c = charts[id];
    c.chart.setData([x].concat(ys));
    const counts = ys.map((y) => y.filter((v) => v !== null && v !== undefined).length);
    c.el.dataset.points = String(counts.reduce((a, b) => a + b, 0));
    c.el.dataset.seriesPoints = JSON.stringify(counts);
  }

  function ratio(num, den) {
    return num.map((v, i) => (v === null || !den[i] ? null : v / den[i]));
  }

  // The sources of the columns named `<metric>/src:<source>`, sorted.
  function sourcesOf(metric) {
    const head = metric + SOURCE_MARK;
    return Object.keys(history.cols).filter((n) => n.startsWith(head)).map((n) => n.slice(head.length)).sort();
  }

  function bySource(metrics) {
    const sources = [...new Set(metrics.flatMap(sourcesOf))].sort();
    // The first metric the source has any value of (greedy accuracy is off in some runs).
    const cols = sources.map((s) => {
      const named = metrics.map((m) => history.cols[m + SOURCE_MARK + s]).filter((col) => col);
      return named.find((col) => col.some((v) => v !== null)) || named[0];
    });
    return { sources, cols };
  }

  function drawHistory() {
    const x = history.steps;
    const c = history.cols;
    const acc = bySource(ACCURACY_BY_SOURCE);
    setLines("chart-accuracy", ["held-out accuracy", ...acc.sources], x, [c.heldout_accuracy, ...acc.cols]);
    const rew = bySource([REWARD_BY_SOURCE]);
    setLines("chart-reward", ["reward mean", ...rew.sources], x, [c.reward_mean, ...rew.cols]);
    setChart("chart-kept", x, [ratio(c.samples_kept, c.samples_before),
      ratio(c.tokens_kept, c.tokens_valid), c.sample_ratio, c.token_ratio]);
    setChart("chart-staleness", x, [c.staleness_mean, c.staleness_max, c.token_staleness_mean]);
    setChart("chart-loss", x, [c.loss]);
  }

  // ---- polling ------------------------------------------------------------------------------

  async function getJSON(path) {
    const r = await fetch(path, { cache: "no-store" });
    if (r.status === 404) return null; // e.g. no schedule written yet
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  async function pollHistory() {
    let grew = false;
    for (;;) {
      // No names: every metric of the rows, so per-source series are found when they appear.
      const page = await getJSON(`metrics/history?since_step=${nextSince}&limit=${PAGE}`);
      if (!page || page.steps.length === 0) break;
      const before = history.steps.length;
      history.steps.push(...page.steps);
      for (const n of Object.keys(page.series)) {
        if (!(n in history.cols) && PER_SOURCE.some((p) => n.startsWith(p))) history.cols[n] = new Array(before).fill(null);
      }
      const gap = page.steps.map(() => null);
      for (const [n, col] of Object.entries(history.cols)) col.push(...(page.series[n] || gap));
      nextSince = page.next_since_step;
      grew = true;
      if (!page.more) break;
    }
    if (grew) drawHistory();
  }

  function text(id, value) {
    document.getElementById(id).textContent = value;
  }

  function fmt(v, digits) {
    return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
  }

  function latest(name) {
    const col = history.cols[name];
    for (let i = col.length - 1; i >= 0; i--) if (col[i] !== null) return col[i];
    return null;
  }

  function showStatus(m, sched) {
    const badge = document.getElementById("run-status");
    let label = "running", cls = "running";
    if (m.done) { label = "done"; cls = "done"; }
    else if (m.stop_reason) { label = `stopping: ${m.stop_reason}`; cls = "stopping"; }
    else if (m.paused) { label = "paused"; cls = "paused"; }
    badge.textContent = label;
    badge.className = `badge ${cls}`;
    const step = sched && sched.step !== null ? sched.step : null;
    const total = sched && sched.total_steps ? sched.total_steps : null;
    const frac = sched && sched.progress !== null ? sched.progress : (step !== null && total ? step / total : 0);
    document.getElementById("progress-bar").style.width = `${Math.min(100, Math.max(0, 100 * frac))}%`;
    text("progress-text", step === null ? "step –" : `step ${step}${total ? ` / ${total}` : ""}`);
    document.body.dataset.step = step === null ? "" : String(step);
  }

  function showTiles(m, sched, tp) {
    const acc = m.metrics.heldout_accuracy ?? latest("heldout_accuracy");
    text("t-accuracy", fmt(acc, 3));
    text("t-reward", fmt(m.metrics.reward_mean ?? latest("reward_mean"), 3));
    text("t-schedule", sched ? `${sched.preset ?? "?"} · ${fmt(sched.sample_ratio, 2)} · ${fmt(sched.token_ratio, 2)}` : "–");
    if (tp) {
      text("t-samples", fmt(tp.samples_per_s.value, 1));
      text("t-tokens", fmt(tp.tokens_per_s.value, 0));
      const busy = tp.learner_busy_fraction.value;
      text("t-busy", busy === null ? "–" : `${(100 * busy).toFixed(0)}%`);
    }
    text("t-queues", `${m.queues.groups} · ${m.queues.batches} · ${m.queues.dead}`);
    text("t-stale", `${m.counters.groups_stale ?? 0} · ${m.counters.dead ?? 0}`);
    // Pre-rollout prompt selection (rollout.prefilter): absent metrics mean it is off.
    const zeroVar = m.metrics.prefilter_actual_zero_var;
    text("t-prefilter", zeroVar === undefined ? "off" : `${m.counters.prompts_prefiltered ?? 0} · ${fmt(m.metrics.prefilter_predicted_zero_var, 2)} · ${fmt(zeroVar, 2)}`);
  }

  function fillTable(id, rows, empty) {
    const body = document.querySelector(`#${id} tbody`);
    body.replaceChildren();
    if (rows.length === 0) {
      const tr = body.insertRow();
      const td = tr.insertCell();
      td.colSpan = 5; td.className = "empty"; td.textContent = empty;
      return;
    }
    for (const cells of rows) {
      const tr = body.insertRow();
      for (const [value, cls] of cells) {
        const td = tr.insertCell();
        td.textContent = value;
        if (cls) td.className = cls;
      }
    }
  }

  function showTables(actors, dead, ckpts) {
    if (actors) fillTable("actors", actors.actors.map((a) => [
      [a.name], [a.weight_version ?? "–"], [a.versions_behind ?? "–"], [a.groups_published ?? "–"],
      [a.seconds_since_heartbeat === null ? "–" : `${a.seconds_since_heartbeat.toFixed(0)} s ago`],
    ]), "no heartbeat yet");
    if (dead) fillTable("dead", Object.entries(dead.by_reason).map(([r, n]) => [[r], [n]]), "none");
    if (ckpts) fillTable("checkpoints", ckpts.checkpoints.slice(-5).reverse().map((c) => [[c.step], [c.path, "path"]]), "none yet");
  }

  function sampleQueues(m) {
    queues.t.push(Date.now() / 1000);
    for (const k of ["groups", "batches", "dead"]) queues[k].push(m.queues[k]);
    if (queues.t.length > QUEUE_POINTS) for (const k in queues) queues[k].shift();
    setChart("chart-queues", queues.t, [queues.groups, queues.batches, queues.dead]);
  }

  async function poll() {
    const err = document.getElementById("api-error");
    try {
      const [m, sched, tp, actors, dead, ckpts] = await Promise.all([
        getJSON("metrics"), getJSON("schedule"), getJSON("metrics/throughput"),
        getJSON("actors"), getJSON("dead-letters?count=200"), getJSON("checkpoints"),
      ]);
      await pollHistory();
      showStatus(m, sched);
      showTiles(m, sched, tp);
      showTables(actors, dead, ckpts);
      sampleQueues(m);
      err.hidden = true;
    } catch (e) {
      err.textContent = `API: ${e.message}`;
      err.hidden = false;
      document.getElementById("run-status").className = "badge down";
    } finally {
      window.setTimeout(poll, INTERVAL_MS);
    }
  }

  makeChart("chart-accuracy", ["held-out accuracy"], { y01: true });
  makeChart("chart-reward", ["reward mean"]);
  makeChart("chart-kept", ["samples kept", "tokens kept", "schedule ρs", "schedule K"],
    { y01: true, dashed: ["schedule ρs", "schedule K"] });
  makeChart("chart-staleness", ["groups, mean", "groups, max", "tokens, mean"]);
  makeChart("chart-queues", ["groups", "batches", "dead"], { time: true });
  makeChart("chart-loss", ["loss"]);
  window.addEventListener("resize", () => {
    for (const { chart, el } of Object.values(charts)) chart.setSize({ width: Math.max(300, el.clientWidth), height: 220 });
  });
  window.d3sDashboard = { history, queues, charts };
  poll();
})();
