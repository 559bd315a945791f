// The live page: polls the coordinator's /api/status and /api/steps and redraws. No libraries:
// charts are inline SVG polylines, so nothing is fetched from outside the coordinator.
"use strict";

const steps = [];              // every aggregated step so far, in order
let lastGrid = null;
let done = false;
let pollsAfterEnd = 0;         // refreshes since the run reached a final state (see refresh)

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];

function $(id) { return document.getElementById(id); }

function setText(id, v) { $(id).textContent = String(v); }

// An axis label that fits the margin: 1520, 0.374, 5.4e-4.
function label(v) {
  const a = Math.abs(v);
  if (a >= 1000) { return v.toFixed(0); }
  if (a !== 0 && a < 0.01) { return v.toExponential(1); }
  return String(Number(v.toPrecision(3)));
}

// Draws `series` ([{name, values: [[x, y], ...]}]) into the element `id` as one SVG, at most
// ~1500 vertices per line; `data-points` on each line is the number of points it stands for.
function lineChart(id, series, emptyText) {
  const el = $(id);
  const all = series.flatMap(s => s.values).filter(p => Number.isFinite(p[1]));
  if (all.length === 0) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = emptyText || "no data yet";
    el.replaceChildren(empty);
    return;
  }
  const W = 600, H = 170, L = 52, R = 8, T = 8, B = 20;
  let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
  let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const axis = (x, y, text, anchor) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "10");
    t.setAttribute("text-anchor", anchor); t.setAttribute("fill", "#666"); t.textContent = text;
    svg.appendChild(t);
  };
  axis(L - 4, T + 8, label(y1), "end");
  axis(L - 4, H - B, label(y0), "end");
  axis(L, H - 4, String(x0), "start");
  axis(W - R, H - 4, String(x1), "end");
  series.forEach((s, i) => {
    const pts = s.values.filter(p => Number.isFinite(p[1]));
    const stride = Math.max(1, Math.ceil(pts.length / 1500));
    const drawn = pts.filter((_, j) => j % stride === 0 || j === pts.length - 1);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", drawn.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "1.2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    line.setAttribute("data-series", s.name);
    line.setAttribute("data-points", String(pts.length));
    svg.appendChild(line);
    // Few points (FID, a young run): mark each, so that a single one shows.
    if (pts.length <= 60) {
      pts.forEach(p => {
        const dot = document.createElementNS(ns, "circle");
        dot.setAttribute("cx", sx(p[0]).toFixed(1)); dot.setAttribute("cy", sy(p[1]).toFixed(1));
        dot.setAttribute("r", "3"); dot.setAttribute("fill", COLORS[i % COLORS.length]);
        svg.appendChild(dot);
      });
    }
  });
  const legend = document.createElement("div");
  legend.className = "legend";
  series.forEach((s, i) => {
    const span = document.createElement("span");
    span.style.color = COLORS[i % COLORS.length];
    const last = s.values.length ? s.values[s.values.length - 1][1] : NaN;
    span.textContent = `${s.name} ${Number.isFinite(last) ? last.toPrecision(4) : ""}`;
    legend.appendChild(span);
  });
  el.replaceChildren(svg, legend);
}

function drawCharts(status) {
  const xy = key => steps.map(s => [s.step, s[key]]);
  lineChart("chart-losses", [{ name: "loss_D", values: xy("loss_d") }, { name: "loss_G", values: xy("loss_g") }]);
  lineChart("chart-d", [
    { name: "D(x)", values: xy("d_x") },
    { name: "D(G(z)) before D's update", values: xy("d_g_z1") },
    { name: "D(G(z)) after", values: xy("d_g_z2") },
  ]);
  lineChart("chart-speed", [{ name: "images/s", values: xy("images_per_sec") }]);
  lineChart("chart-fid", [{ name: "FID", values: (status.evaluations || []).map(e => [e.epoch + 1, e.fid]) }],
    status.eval_every > 0 ? "computed at the end of the first evaluated epoch" : "off: the coordinator's --eval-every N turns it on");
}

function drawGrids(status) {
  const grids = status.grids || [];
  // The generator's newest grid (a --sample-every step or an epoch's end); never a real one.
  const latest = status.latest_grid;
  if (!latest) {
    setText("no-grid", status.sample_every > 0
      ? `No generator grid yet: the first is drawn at step ${status.sample_every} (--sample-every) or at the end of epoch 1.`
      : "No generator grid yet: the first is drawn at the end of epoch 1.");
  } else if (latest.name !== lastGrid) {
    lastGrid = latest.name;
    const img = $("latest-grid");
    img.src = `/samples/${latest.name}?t=${Date.now()}`;
    img.dataset.grid = latest.name;
    img.hidden = false;
    $("no-grid").hidden = true;
    setText("latest-grid-label", `at ${latest.label}`);
  }
  const box = $("grids");
  const names = grids;
  if (box.childElementCount !== names.length) {
    box.replaceChildren(...names.map(n => {
      const f = document.createElement("figure");
      const a = document.createElement("a");
      a.href = `/samples/${n}`;
      const img = document.createElement("img");
      img.src = `/samples/${n}`;
      img.alt = n;
      a.appendChild(img);
      const c = document.createElement("figcaption");
      c.textContent = `epoch ${Number(n.replace(/\D/g, "")) + 1}`;
      f.append(a, c);
      return f;
    }));
  }
}

function cell(row, text) {
  const td = document.createElement("td");
  if (text instanceof Node) { td.appendChild(text); } else { td.textContent = String(text); }
  row.appendChild(td);
}

function drawTables(status) {
  const wb = $("workers").tBodies[0];
  wb.replaceChildren(...(status.workers || []).map(w => {
    const tr = document.createElement("tr");
    [w.rank, w.state.replace("WORKER_STATE_", ""), w.hostname, w.pid, w.device, w.last_step,
     `${w.seconds_since_heartbeat.toFixed(1)} s ago`].forEach(v => cell(tr, v));
    return tr;
  }));
  const files = ["generator.safetensors", "discriminator.safetensors", "optimizer.safetensors", "state.json", "SHA256SUMS"];
  const cb = $("checkpoints").tBodies[0];
  cb.replaceChildren(...(status.checkpoints || []).slice().reverse().map(c => {
    const tr = document.createElement("tr");
    // Epochs are shown 1-based, as in the header: step 781 of 781 per epoch ends epoch 1.
    cell(tr, c.step); cell(tr, c.epoch + 1); cell(tr, `${(c.total_size / 1048576).toFixed(1)} MiB`);
    const span = document.createElement("span");
    files.forEach(f => {
      const a = document.createElement("a");
      a.href = `/${c.path}/${f}`; a.textContent = f; a.download = f;
      span.append(a, " ");
    });
    cell(tr, span);
    return tr;
  }));
}

function drawHeader(status) {
  setText("run-id", status.run_id || "");
  const state = $("state");
  state.textContent = status.state;
  state.className = `badge ${status.state}`;
  setText("step", status.step ?? 0);
  setText("total-steps", status.total_steps ?? "?");
  setText("epoch", Math.min((status.epoch ?? 0) + 1, status.epochs ?? 1));
  setText("epochs", status.epochs ?? "?");
  setText("dataset", status.dataset ? `dataset ${status.dataset}` : "");
  setText("generation", status.generation ?? "–");
  const last = steps[steps.length - 1];
  setText("images-per-sec", last ? last.images_per_sec.toFixed(1) : "–");
  const err = $("error");
  err.hidden = !status.error;
  err.textContent = status.error || "";
  const warnings = (status.health && status.health.warnings) || [];
  const ul = $("warnings");
  ul.hidden = warnings.length === 0;
  ul.replaceChildren(...warnings.map(w => { const li = document.createElement("li"); li.textContent = w; return li; }));
}

async function fetchJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) { throw new Error(`${url}: ${r.status}`); }
  return r.json();
}

async function refresh() {
  const status = await fetchJson("/api/status");
  for (;;) {
    const page = await fetchJson(`/api/steps?since=${steps.length}`);
    steps.push(...page.steps);
    if (page.steps.length === 0 || steps.length >= (status.step ?? 0)) { break; }
  }
  drawHeader(status);
  drawGrids(status);
  drawCharts(status);
  drawTables(status);
  document.body.dataset.steps = String(steps.length);
  document.body.dataset.state = status.state;
  // The last epoch's grid is drawn from the final checkpoint after the run ends: keep polling
  // until no grid is pending (for a minute at most, should the renderer have died).
  const ended = ["COMPLETED", "FAILED", "STOPPED"].includes(status.state);
  if (ended) { pollsAfterEnd += 1; }
  return ended && (!(status.samples_pending > 0) || pollsAfterEnd > 60);
}

async function loop() {
  try {
    done = await refresh();
  } catch (e) {
    // The coordinator may have exited: show it rather than failing silently.
    setText("state", "UNREACHABLE");
  }
  if (!done) { setTimeout(loop, 1000); }
}

loop();
