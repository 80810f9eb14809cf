// datumflow console: routes on the URL's hash, polls the JSON API, redraws the view.
// No framework, no build step. Every text from the API goes through esc(), and no markup holds
// code: clicks go through one listener reading data attributes.
"use strict";

const POLL_MS = 1500;
const state = { route: "", timer: null, openDatum: "", jobsPipeline: "" };

// The token arrives once in the URL (?token=...): kept for this tab, taken out of the address bar.
(function keepToken() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem("datumflow-token", token);
    history.replaceState(null, "", location.pathname + location.hash);
  }
})();

function token() { return sessionStorage.getItem("datumflow-token") || ""; }

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => (
    { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["X-Datumflow-Token"] = token();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const type = response.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function seconds(s) {
  if (!s || s <= 0) return "0 s";
  if (s < 0.001) return `${Math.round(s * 1e6)} µs`;
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  const w = Math.round(s);
  if (w < 3600) return `${Math.floor(w / 60)}m ${w % 60}s`;
  return `${Math.floor(w / 3600)}h ${Math.floor((w % 3600) / 60)}m`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let size = n || 0, i = 0;
  while (size >= 1024 && i < units.length - 1) { size /= 1024; i++; }
  return i ? `${size.toFixed(1)} ${units[i]}` : `${size} B`;
}

function when(t) { return t ? new Date(t * 1000).toLocaleString() : "-"; }
function short(id) { return String(id || "").slice(0, 12); }
function badge(s) { return `<span class="state ${esc(s)}">${esc(s)}</span>`; }
function num(v) { return v === null || v === undefined ? "–" : esc(v); }

function toast(text) {
  const el = document.getElementById("toast");
  el.textContent = text;
  el.hidden = false;
  setTimeout(() => { el.hidden = true; }, 6000);
}

// -- the DAG ----------------------------------------------------------------------------------

function layers(dag) {
  const inputs = {};
  for (const e of dag.edges) (inputs[e.to] = inputs[e.to] || []).push(e.from);
  const depth = {};
  const visit = (id, seen) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0; // a cycle cannot be made, but never loop on one
    seen.add(id);
    const ins = inputs[id] || [];
    depth[id] = ins.length ? 1 + Math.max(...ins.map((i) => visit(i, seen))) : 0;
    return depth[id];
  };
  for (const n of dag.nodes) visit(n.id, new Set());
  return depth;
}

function dagSvg(dag) {
  const W = 230, H = 62, GX = 80, GY = 26;
  const depth = layers(dag);
  const columns = {};
  for (const n of dag.nodes) (columns[depth[n.id]] = columns[depth[n.id]] || []).push(n);
  const pos = {};
  let rows = 0;
  for (const [d, nodes] of Object.entries(columns)) {
    nodes.sort((a, b) => a.id.localeCompare(b.id));
    nodes.forEach((n, i) => { pos[n.id] = { x: 10 + d * (W + GX), y: 10 + i * (H + GY) }; });
    rows = Math.max(rows, nodes.length);
  }
  const width = 20 + (Object.keys(columns).length) * (W + GX) - GX;
  const height = 20 + rows * (H + GY) - GY;
  const edges = dag.edges.filter((e) => pos[e.from] && pos[e.to]).map((e) => {
    const a = pos[e.from], b = pos[e.to];
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    return `<path class="edge" marker-end="url(#arrow)" d="M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 4},${y2}"><title>${esc(e.from)} → ${esc(e.to)} (glob ${esc(e.glob)})</title></path>`;
  });
  const nodes = dag.nodes.map((n) => {
    const p = pos[n.id];
    const href = n.kind === "pipeline" ? `#/pipeline/${encodeURIComponent(n.id)}` : `#/repo/${encodeURIComponent(n.id)}`;
    const line2 = n.kind === "pipeline"
      ? `${esc(n.state)} · lag ${num(n.lag)} · workers ${num(n.running)}/${num(n.desired)}`
      : (n.missing ? "missing" : "repo");
    const line3 = n.kind === "pipeline" && n.last_job ? `last job ${esc(short(n.last_job))} ${esc(n.last_job_state)}` : "";
    const colour = { running: "#1f9d55", standby: "#8a93a6", failure: "#d2343f", paused: "#8a93a6" }[n.state] || "#2f6fde";
    const dot = n.kind === "pipeline" ? `<circle cx="${W - 14}" cy="14" r="5" fill="${colour}"/>` : "";
    return `<g class="node ${esc(n.kind)} ${esc(n.state || "")}" data-node="${esc(n.id)}" data-kind="${esc(n.kind)}" transform="translate(${p.x},${p.y})" data-href="${esc(href)}">
      <rect width="${W}" height="${H}" rx="8"/>${dot}
      <text x="10" y="19" font-weight="700">${esc(n.id)}</text>
      <text x="10" y="37" fill="#6b7385">${line2}</text>
      <text x="10" y="53" fill="#6b7385">${line3}</text></g>`;
  });
  return `<svg width="${width}" height="${height}" role="img" aria-label="DAG">
    <defs><marker id="arrow" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#9aa3b5"/></marker></defs>
    ${edges.join("")}${nodes.join("")}</svg>`;
}

async function viewDag() {
  const dag = await api("/api/dag");
  const pipelines = dag.nodes.filter((n) => n.kind === "pipeline");
  const repos = dag.nodes.filter((n) => n.kind === "repo");
  return `<h1>DAG</h1>
    <div class="panel dag" id="dag">${dag.nodes.length ? dagSvg(dag) : '<p class="muted">No repos yet: <code>datumflow create repo NAME</code>.</p>'}</div>
    <h2>Pipelines</h2>
    <div class="panel"><table><tr><th>pipeline</th><th>state</th><th>lag</th><th>workers (running / desired)</th><th>last job</th></tr>
    ${pipelines.map((p) => `<tr class="clickable" data-href="#/pipeline/${esc(encodeURIComponent(p.id))}">
      <td><a href="#/pipeline/${encodeURIComponent(p.id)}">${esc(p.id)}</a> <span class="muted">v${esc(p.version)}</span></td>
      <td>${badge(p.state)}</td><td>${num(p.lag)}</td><td>${num(p.running)} / ${num(p.desired)}</td>
      <td>${p.last_job ? `<span class="mono">${esc(short(p.last_job))}</span> ${badge(p.last_job_state)}` : "-"}</td></tr>`).join("")}
    </table></div>
    <h2>Repos</h2>
    <div class="panel">${repos.map((r) => `<a href="#/repo/${encodeURIComponent(r.id)}">${esc(r.id)}</a>`).join(" · ") || '<span class="muted">none</span>'}</div>`;
}

// -- jobs -------------------------------------------------------------------------------------

function progress(j) {
  const pct = Math.round((j.progress || 0) * 100);
  return `<div class="bar" title="${pct}%"><i class="${j.failed ? "bad" : ""}" style="width:${pct}%"></i></div><span class="muted">${pct}%</span>`;
}

function jobRows(jobs) {
  return `<table><tr><th>job</th><th>pipeline</th><th>state</th><th>total</th><th>processed</th><th>skipped</th><th>failed</th><th>recovered</th><th>queued</th><th>progress</th><th>duration</th><th>started</th></tr>
    ${jobs.map((j) => `<tr class="clickable" data-job="${esc(j.id)}" data-href="#/job/${esc(encodeURIComponent(j.pipeline))}/${esc(encodeURIComponent(j.id))}">
      <td class="mono"><a href="#/job/${encodeURIComponent(j.pipeline)}/${encodeURIComponent(j.id)}">${esc(short(j.id))}</a></td>
      <td>${esc(j.pipeline)}</td><td>${badge(j.state)}</td><td>${j.total}</td><td>${j.processed}</td><td>${j.skipped}</td>
      <td>${j.failed}</td><td>${j.recovered}</td><td>${j.queued}</td><td>${progress(j)}</td>
      <td>${seconds(j.duration)}</td><td>${when(j.started || j.created)}</td></tr>`).join("")}</table>`;
}

async function viewJobs() {
  const { jobs } = await api("/api/jobs");
  return `<h1>Jobs</h1><div class="panel">${jobs.length ? jobRows(jobs) : '<p class="muted">No jobs yet.</p>'}</div>`;
}

async function viewPipeline(name) {
  const [{ jobs }, workers] = await Promise.all([
    api(`/api/jobs?pipeline=${encodeURIComponent(name)}`),
    api(`/api/workers?pipeline=${encodeURIComponent(name)}`),
  ]);
  return `<h1>Pipeline ${esc(name)}</h1>
    <p><a href="#/repo/${encodeURIComponent(name)}">output repo ${esc(name)}: commits and provenance</a></p>
    <h2>Workers over time</h2><div class="panel">${chart(name, workers.series[name] || [], workers.period)}</div>
    <h2>Jobs</h2><div class="panel">${jobs.length ? jobRows(jobs) : '<p class="muted">No jobs yet.</p>'}</div>`;
}

function counts(job) {
  const items = [["processed", job.processed], ["skipped", job.skipped], ["failed", job.failed],
    ["recovered", job.recovered], ["queued", job.queued], ["total", job.total]];
  return `<div class="counts">${items.map(([k, v]) => `<div class="count ${k}"><b id="count-${k}">${v}</b><span>${k}</span></div>`).join("")}
    <div class="count"><b id="job-duration">${seconds(job.duration)}</b><span>duration</span></div></div>`;
}

function datumDetail(d, job) {
  return `<tr class="detail" data-detail="${esc(d.id)}"><td colspan="8">
    ${d.error ? `<div>error:</div><div class="error datum-error">${esc(d.error)}</div>` : ""}
    <div>input files: ${d.files.length ? d.files.map((f) => `<code>${esc(f)}</code>`).join(", ") : '<span class="muted">not listed</span>'}</div>
    <div>download ${seconds(d.download_time)} (${bytes(d.download_bytes)}) · process ${seconds(d.process_time)} · upload ${seconds(d.upload_time)} (${bytes(d.upload_bytes)}) · attempts ${d.attempts}</div>
    <div>log:</div><pre class="datum-log" id="log-${esc(d.id)}">${d.has_log ? "loading…" : "(no log kept)"}</pre></td></tr>`;
}

async function loadLog(pipeline, job, datum) {
  const el = document.getElementById(`log-${datum}`);
  if (!el || el.dataset.loaded) return;
  try {
    const text = await api(`/api/jobs/${encodeURIComponent(pipeline)}/${encodeURIComponent(job)}/datums/${encodeURIComponent(datum)}/log`);
    el.textContent = text || "(empty)";
  } catch (err) { el.textContent = `log: ${err.message}`; }
  el.dataset.loaded = "1";
  state.logs[datum] = el.textContent;
}

function toggleDatum(id) {
  state.openDatum = state.openDatum === id ? "" : id;
  refresh();
}

async function rerun(pipeline, job) {
  if (!token()) { toast("Rerunning needs the console's token: open the URL `datumflow up` printed."); return; }
  try {
    const button = document.getElementById("rerun");
    if (button) button.disabled = true;
    const done = await api(`/api/jobs/${encodeURIComponent(pipeline)}/${encodeURIComponent(job)}/rerun`, { method: "POST" });
    if (done.nothing) { toast(done.message); return; }
    toast(`Rerunning ${done.rerun} datum(s), ${done.carried} carried over, as job ${short(done.new_job)}`);
    location.hash = `#/job/${encodeURIComponent(pipeline)}/${encodeURIComponent(done.new_job)}`;
  } catch (err) { toast(err.message); }
}

async function viewJob(pipeline, id) {
  const job = await api(`/api/jobs/${encodeURIComponent(pipeline)}/${encodeURIComponent(id)}`);
  const rows = job.datums.map((d) => {
    const row = `<tr class="clickable" data-datum="${esc(d.id)}" data-state="${esc(d.state)}" data-toggle="${esc(d.id)}">
      <td class="mono">${esc(short(d.id))}</td><td>${badge(d.state)}</td><td>${d.attempts}</td>
      <td>${seconds(d.time)}</td><td>${seconds(d.download_time)} / ${seconds(d.process_time)} / ${seconds(d.upload_time)}</td>
      <td>${d.files.slice(0, 3).map((f) => `<code>${esc(f)}</code>`).join(", ")}${d.files.length > 3 ? " …" : ""}</td>
      <td class="error">${esc((d.error || "").split("\n")[0].slice(0, 120))}</td></tr>`;
    return d.id === state.openDatum ? row + datumDetail(d, job) : row;
  });
  // What `datumflow rerun job --failed` reruns: failed datums, and those a killed job never ran.
  const canRerun = ["success", "failure", "killed"].includes(job.state) && (job.failed > 0 || job.state === "killed");
  return `<h1>Job <span class="mono">${esc(short(job.id))}</span> of <a href="#/pipeline/${encodeURIComponent(pipeline)}">${esc(pipeline)}</a> ${badge(job.state)}</h1>
    ${job.reason ? `<p class="error">${esc(job.reason)}</p>` : ""}
    ${counts(job)}
    <div class="panel"><div style="display:flex;gap:10px;align-items:center">${progress(job)}</div>
      <p class="muted">started ${when(job.started || job.created)} · finished ${when(job.finished)} ·
      inputs ${job.input_commits.map((c) => `<a href="#/repo/${encodeURIComponent(c.repo)}">${esc(c.repo)}</a>@<span class="mono">${esc(short(c.commit))}</span>`).join(", ") || "-"}
      ${job.output_commit ? ` · output <a href="#/repo/${encodeURIComponent(pipeline)}">${esc(pipeline)}</a>@<span class="mono">${esc(short(job.output_commit))}</span>` : ""}</p>
      ${canRerun ? `<button id="rerun" data-pipeline="${esc(pipeline)}" data-job="${esc(job.id)}">${job.state === "killed" ? "Rerun what failed or never ran" : `Rerun ${job.failed} failed datum(s)`}</button>` : ""}</div>
    <h2>Datums <span class="muted">(failed first, then slowest; ${job.datums_listed} of ${job.datums_with_result} with a result)</span></h2>
    <div class="panel"><table id="datums"><tr><th>datum</th><th>state</th><th>attempts</th><th>time</th><th>download / process / upload</th><th>input files</th><th>error</th></tr>
    ${rows.join("")}</table></div>`;
}

// -- workers chart ----------------------------------------------------------------------------

function chart(name, samples, period) {
  const W = 560, H = 170, L = 34, R = 44, T = 10, B = 22;
  if (!samples.length) return `<p class="muted">No samples of ${esc(name)} yet (one every ${period} s).</p>`;
  const t0 = samples[0].time, t1 = Math.max(samples[samples.length - 1].time, t0 + 1);
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const maxWorkers = Math.max(1, ...samples.map((s) => Math.max(s.desired || 0, s.running || 0)));
  const maxLag = Math.max(1, ...samples.map((s) => s.lag || 0));
  const yw = (v) => T + (1 - v / maxWorkers) * (H - T - B);
  const yl = (v) => T + (1 - v / maxLag) * (H - T - B);
  const step = (key, y) => samples.filter((s) => s[key] !== null).map((s, i) => `${i ? "L" : "M"}${x(s.time).toFixed(1)},${y(s[key]).toFixed(1)}`).join(" ");
  const lagPts = samples.filter((s) => s.lag !== null);
  const lagArea = lagPts.length ? `M${x(lagPts[0].time)},${yl(0)} ` + lagPts.map((s) => `L${x(s.time).toFixed(1)},${yl(s.lag).toFixed(1)}`).join(" ") + ` L${x(lagPts[lagPts.length - 1].time)},${yl(0)} Z` : "";
  const last = samples[samples.length - 1];
  const grid = [0, 0.5, 1].map((f) => `<line class="grid" x1="${L}" x2="${W - R}" y1="${T + f * (H - T - B)}" y2="${T + f * (H - T - B)}"/>`).join("");
  return `<div class="chart" data-chart="${esc(name)}">
    <div class="legend"><span><i style="background:#2f6fde"></i>lag (right axis, max ${maxLag})</span><span><i style="background:#c98a00"></i>desired</span><span><i style="background:#1f9d55"></i>running</span>
    <span>now: lag ${num(last.lag)}, ${num(last.running)} running / ${num(last.desired)} desired</span></div>
    <svg viewBox="0 0 ${W} ${H}" style="width:100%;max-width:${W}px;height:auto" role="img" aria-label="workers of ${esc(name)}">${grid}
    <path class="lag" d="${lagArea}"/><path class="running" d="${step("running", yw)}"/><path class="desired" d="${step("desired", yw)}"/>
    <text x="${L - 6}" y="${T + 4}" text-anchor="end">${maxWorkers}</text><text x="${L - 6}" y="${H - B}" text-anchor="end">0</text>
    <text x="${W - R + 6}" y="${T + 4}">${maxLag}</text><text x="${W - R + 6}" y="${H - B}">0</text>
    <text x="${L}" y="${H - 4}" fill="#6b7385">${new Date(t0 * 1000).toLocaleTimeString()}</text>
    <text x="${W - R}" y="${H - 4}" text-anchor="end" fill="#6b7385">${new Date(t1 * 1000).toLocaleTimeString()}</text></svg></div>`;
}

async function viewWorkers() {
  const workers = await api("/api/workers");
  const names = Object.keys(workers.series);
  return `<h1>Workers over time</h1><p class="muted">Lag, desired and running workers per pipeline, sampled every ${workers.period} s since the console started.</p>
    <div class="grid2">${names.map((n) => `<div class="panel"><h2 style="margin-top:0"><a href="#/pipeline/${encodeURIComponent(n)}">${esc(n)}</a></h2>${chart(n, workers.series[n], workers.period)}</div>`).join("") || '<p class="muted">No pipelines.</p>'}</div>`;
}

// -- repos, commits, files --------------------------------------------------------------------

async function viewRepo(repo, commit) {
  const data = await api(`/api/repos/${encodeURIComponent(repo)}/commits`);
  const rows = data.commits.map((c) => `<tr class="clickable" data-commit="${esc(c.id)}" data-href="#/repo/${esc(encodeURIComponent(repo))}/${esc(encodeURIComponent(c.id))}">
    <td class="mono">${esc(short(c.id))}</td><td>${esc(c.branch)}</td><td>${esc(c.origin)}</td><td>${c.files}</td><td>${bytes(c.size_bytes)}</td>
    <td>${when(c.finished)}</td>
    <td>${c.provenance.map((p) => `<a href="#/repo/${encodeURIComponent(p.repo)}/${encodeURIComponent(p.commit)}">${esc(p.repo)}@<span class="mono">${esc(short(p.commit))}</span></a>`).join(", ") || "-"}
    ${c.job ? ` <span class="muted">by job</span> <a class="mono" href="#/job/${encodeURIComponent(repo)}/${encodeURIComponent(c.job)}">${esc(short(c.job))}</a>` : ""}</td></tr>`);
  let files = "";
  if (commit) {
    const f = await api(`/api/repos/${encodeURIComponent(repo)}/commits/${encodeURIComponent(commit)}/files`);
    files = `<h2>Files of <span class="mono">${esc(short(commit))}</span> <span class="muted">(${f.files.length} of ${f.files_total})</span></h2>
      <div class="panel"><table><tr><th>path</th><th>size</th></tr>${f.files.map((x) => `<tr><td><code>${esc(x.path)}</code></td><td>${bytes(x.size)}</td></tr>`).join("")}</table></div>`;
  }
  return `<h1>Repo ${esc(repo)}${data.pipeline ? ` <span class="muted">(output of <a href="#/pipeline/${encodeURIComponent(data.pipeline)}">${esc(data.pipeline)}</a>)</span>` : ""}</h1>
    <h2>Commits of ${esc(data.branch)}, newest first</h2>
    <div class="panel"><table><tr><th>commit</th><th>branch</th><th>origin</th><th>files</th><th>size</th><th>finished</th><th>provenance: made from</th></tr>${rows.join("")}</table></div>${files}`;
}

// -- routing and polling ----------------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  switch (parts[0]) {
    case "jobs": return ["jobs", viewJobs];
    case "workers": return ["workers", viewWorkers];
    case "pipeline": return ["dag", () => viewPipeline(parts[1])];
    case "job": return ["jobs", () => viewJob(parts[1], parts[2])];
    case "repo": return ["dag", () => viewRepo(parts[1], parts[2])];
    default: return ["dag", viewDag];
  }
}

async function refresh() {
  clearTimeout(state.timer);
  const [nav, view] = route();
  const key = location.hash;
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === nav));
  const live = document.getElementById("live");
  try {
    const html = await view();
    if (key === location.hash) {
      document.getElementById("view").innerHTML = html;
      for (const [datum, text] of Object.entries(state.logs)) {
        const el = document.getElementById(`log-${datum}`);
        if (el) { el.textContent = text; el.dataset.loaded = "1"; }
      }
      const [, , p, j] = location.hash.split("/");
      if (state.openDatum && p && j) loadLog(decodeURIComponent(p), decodeURIComponent(j), state.openDatum);
    }
    live.textContent = `live · ${new Date().toLocaleTimeString()}`;
    live.classList.remove("stale");
  } catch (err) {
    if (key === location.hash) document.getElementById("view").innerHTML = `<p class="error">${esc(err.message)}</p>`;
    live.textContent = "not reachable";
    live.classList.add("stale");
  }
  state.timer = setTimeout(refresh, POLL_MS);
}

// One listener for every click: the markup carries data, never code.
document.addEventListener("click", (event) => {
  const target = event.target;
  if (!(target instanceof Element) || target.closest("a")) return;
  const button = target.closest("button#rerun");
  if (button) { rerun(button.dataset.pipeline, button.dataset.job); return; }
  const toggle = target.closest("[data-toggle]");
  if (toggle) { toggleDatum(toggle.dataset.toggle); return; }
  const link = target.closest("[data-href]");
  if (link) location.hash = link.dataset.href;
});

state.logs = {};
window.addEventListener("hashchange", () => { state.openDatum = ""; state.logs = {}; refresh(); });
refresh();
