// The live dashboard: training sessions (loss and learning-rate charts, sample grids), the
// inference job queue (progress and previews) and the models the services hold. Data comes
// from the gateway's REST routes, live updates from the events WebSocket.
"use strict";

const POLL_MS = 2000;
const SHOWN_SESSIONS = 6;
const SHOWN_JOBS = 20;
const LIVE_STATES = new Set(["loading", "training", "waiting"]);
const LOSS_COLOUR = "rgb(230, 30, 200)";
const LR_COLOUR = "rgb(30, 90, 230)";

const params = new URLSearchParams(location.search);
const settings = {
  events: params.get("events") || localStorage.getItem("loramesh.events")
    || `${location.protocol === "https:" ? "wss" : "ws"}://${location.hostname}:8081/`,
  token: params.get("token") || localStorage.getItem("loramesh.token") || "",
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function api(path) {
  const headers = settings.token ? { Authorization: `Bearer ${settings.token}` } : {};
  const answer = await fetch(path, { headers });
  if (!answer.ok) throw new Error(`${path}: ${answer.status}`);
  return answer.json();
}

function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// ---- settings form -----------------------------------------------------------------------

function setupForm() {
  $("#events-url").value = settings.events;
  $("#token").value = settings.token;
  $("#settings").addEventListener("submit", (e) => {
    e.preventDefault();
    settings.events = $("#events-url").value.trim();
    settings.token = $("#token").value.trim();
    localStorage.setItem("loramesh.events", settings.events);
    localStorage.setItem("loramesh.token", settings.token);
    connectEvents();
  });
}

// ---- training sessions -------------------------------------------------------------------

const sessions = new Map(); // session id -> {node, chart, data: [steps, losses, lrs], lastStep, samples}

function sessionView(id) {
  let view = sessions.get(id);
  if (view) return view;
  const chartBox = el("div", { class: "chart", "data-points": "0" });
  const node = el("article", { class: "session", "data-session-id": id },
    el("h3", {}, id),
    el("div", { class: "meta" }, el("span", { class: "state" }), el("span", { class: "steps" }),
      el("span", { class: "loss" }), el("span", { class: "device" })),
    el("div", { class: "charts" }, chartBox),
    el("div", { class: "samples" }));
  $("#sessions").append(node);
  view = { node, chartBox, chart: null, data: [[], [], []], lastStep: 0, samples: 0, busy: false };
  sessions.set(id, view);
  return view;
}

function makeChart(view) {
  const width = Math.max(320, Math.min(720, $("#sessions").clientWidth - 20));
  view.chart = new uPlot({
    width, height: 220, title: "loss and learning rate by step",
    scales: { x: { time: false }, loss: {}, lr: {} },
    axes: [{ label: "step" }, { scale: "loss", label: "loss", stroke: LOSS_COLOUR },
      { scale: "lr", side: 1, label: "lr", stroke: LR_COLOUR, grid: { show: false } }],
    series: [{ label: "step" }, { label: "loss", scale: "loss", stroke: LOSS_COLOUR, width: 2 },
      { label: "lr", scale: "lr", stroke: LR_COLOUR, width: 1 }],
  }, view.data, view.chartBox);
}

async function refreshLoss(id, view) {
  if (view.busy) return;
  view.busy = true;
  try {
    const history = await api(`/sessions/${encodeURIComponent(id)}/loss?after_step=${view.lastStep}`);
    const points = history.points || [];
    if (!points.length) return;
    for (const p of points) {
      view.data[0].push(p.step); view.data[1].push(p.loss); view.data[2].push(p.learning_rate);
    }
    view.lastStep = points[points.length - 1].step;
    if (!view.chart) makeChart(view); else view.chart.setData(view.data);
    view.chartBox.dataset.points = String(view.data[0].length);
    view.chartBox.dataset.lastStep = String(view.lastStep);
  } finally {
    view.busy = false;
  }
}

function renderSamples(id, view, samples) {
  if (samples.length === view.samples) return;
  const grid = $(".samples", view.node);
  samples.forEach((sample, index) => {
    if (index < view.samples) return;
    let row = grid.querySelector(`.sample-step[data-step="${sample.step}"]`);
    if (!row) {
      row = el("div", { class: "sample-step", "data-step": String(sample.step) }, el("b", {}, `step ${sample.step}`));
      grid.append(row);
    }
    const img = el("img", { class: "sample", alt: sample.prompt, title: sample.prompt, "data-index": String(index),
      src: `/sessions/${encodeURIComponent(id)}/samples/${index}` });
    img.addEventListener("load", () => { img.dataset.loaded = "1"; });
    row.append(img);
  });
  view.samples = samples.length;
}

function renderSession(s) {
  const old = sessions.get(s.session_id);
  if (old && old.createdAt !== s.created_at) { // deleted and created again: a new history
    old.node.remove();
    sessions.delete(s.session_id);
  }
  const view = sessionView(s.session_id);
  view.createdAt = s.created_at;
  $(".state", view.node).textContent = s.state + (s.error ? `: ${s.error}` : "");
  $(".state", view.node).className = `state ${s.state}`;
  view.node.dataset.state = s.state;
  $(".steps", view.node).textContent = `step ${s.completed_steps} / ${s.allowed_steps} (max ${s.max_steps})`;
  $(".loss", view.node).textContent = s.loss != null ? `loss ${s.loss.toFixed(4)}` : "";
  $(".device", view.node).textContent = s.device || "";
  renderSamples(s.session_id, view, s.samples || []);
  return view;
}

let models = { inference: [], trainer: [] };

async function refreshSessions() {
  const listed = (await api("/sessions")).sessions || [];
  const shown = listed.slice(0, SHOWN_SESSIONS);
  const ids = new Set(shown.map((s) => s.session_id));
  for (const [id, view] of sessions) {
    if (!ids.has(id)) { view.node.remove(); sessions.delete(id); }
  }
  await Promise.all(shown.map((s) => refreshLoss(s.session_id, renderSession(s)).catch(() => {})));
  models.trainer = listed.filter((s) => LIVE_STATES.has(s.state) && s.memory_bytes != null)
    .map((s) => ({ service: "trainer", name: `${s.name} (session ${s.session_id}, ${s.state})`, where: s.device,
      bytes: s.memory_bytes }));
  renderModels();
}

async function refreshOneSession(id) {
  try {
    renderSession(await api(`/sessions/${encodeURIComponent(id)}`));
    const view = sessions.get(id);
    if (view) await refreshLoss(id, view);
  } catch (e) { /* gone, or not shown yet: the next poll settles it */ }
}

// ---- job queue ---------------------------------------------------------------------------

const jobs = new Map(); // job id -> row

function jobRow(id) {
  let row = jobs.get(id);
  if (row) return row;
  const fill = el("div", { class: "fill" });
  const preview = el("img", { class: "preview", alt: "" });
  preview.addEventListener("load", () => { preview.dataset.loaded = "1"; });
  row = el("tr", { class: "job", "data-job-id": id, "data-percentage": "0" },
    el("td", {}, el("a", { href: `/output/${id}` }, id.slice(0, 8))),
    el("td", { class: "type" }), el("td", { class: "status" }),
    el("td", {}, el("div", { class: "bar" }, fill)), el("td", {}, preview));
  $("#queue tbody").prepend(row);
  jobs.set(id, row);
  return row;
}

function setProgress(row, percentage) {
  const value = Math.max(0, Math.min(100, Number(percentage) || 0));
  row.dataset.percentage = value.toFixed(1);
  $(".fill", row).style.width = `${value}%`;
}

function setStatus(row, status) {
  row.dataset.status = status;
  $(".status", row).textContent = status;
  $(".status", row).className = `status ${status}`;
  if (status === "completed") setProgress(row, 100);
}

async function refreshQueue() {
  // The newest jobs: items come oldest first, so skip all but the last few.
  const total = (await api("/queue?limit=1")).total_count;
  const queue = await api(`/queue?offset=${Math.max(0, total - SHOWN_JOBS)}`);
  $("#queue-counts").textContent = `${queue.pending_count} pending, ${queue.processing_count} processing, `
    + `${queue.completed_count} completed, ${queue.failed_count} failed`;
  for (const job of queue.items || []) {
    const row = jobRow(job.job_id);
    $(".type", row).textContent = job.type;
    setStatus(row, job.status);
    // A live row moves with the events; the record's progress is only written now and then.
    if (job.status !== "processing" || !row.dataset.live) setProgress(row, job.status === "completed" ? 100 : job.progress?.percentage);
  }
}

function onJobEvent(name, data) {
  const row = jobRow(data.job_id);
  if (name === "job_progress") {
    row.dataset.live = "1";
    setProgress(row, data.percentage ?? (data.total_steps ? 100 * data.step / data.total_steps : 0));
    if (!row.dataset.status || row.dataset.status === "pending") setStatus(row, "processing");
  } else if (name === "job_preview" && data.image) {
    const img = $("img.preview", row);
    img.src = data.image;
    img.dataset.step = String(data.step);
    img.dataset.noisy = String(Boolean(data.is_noisy));
  } else if (name === "job_status_changed") {
    setStatus(row, data.status);
  } else if (name === "job_added") {
    setStatus(row, "pending");
    refreshQueue().catch(() => {});
  }
}

// ---- models ------------------------------------------------------------------------------

async function refreshModels() {
  const health = await api("/health");
  const rows = [];
  if (health.model_loaded) {
    rows.push({ service: "inference", name: `${health.model_name} (${health.model_architecture})`, where: health.model_type });
  } else if (health.model_loading) {
    rows.push({ service: "inference", name: `${health.loading_model_name} (loading)`, where: "" });
  }
  if (health.upscaler_loaded) rows.push({ service: "inference", name: `${health.upscaler_name} (upscaler)`, where: "" });
  models.inference = rows;
  renderModels();
}

// Each inference replica's latest server_status: what it holds and how many bytes.
const replicas = new Map();

function onServerStatus(data) {
  if (data.service !== "inference" || !data.replica) return;
  replicas.set(data.replica, data);
  renderModels();
}

function inferenceRows() {
  const held = [...replicas.values()].filter((s) => s.model_loaded || s.upscaler_loaded);
  if (!replicas.size) return models.inference; // no status yet: what /health says was loaded
  return held.map((s) => ({
    service: "inference",
    name: [s.model_loaded && `${s.model_name} (${s.model_architecture})`,
           s.upscaler_loaded && `${s.upscaler_name} (upscaler)`].filter(Boolean).join(", "),
    where: s.replica, bytes: s.resident_bytes }));
}

function renderModels() {
  const body = $("#models tbody");
  const rows = [...inferenceRows(), ...models.trainer];
  body.replaceChildren(...rows.map((m) => el("tr", { class: "model", "data-service": m.service },
    el("td", {}, m.service), el("td", {}, m.name), el("td", {}, m.where || ""), el("td", {}, bytes(m.bytes)))));
  if (!rows.length) body.append(el("tr", {}, el("td", { colspan: "4" }, "nothing loaded")));
}

// ---- events ------------------------------------------------------------------------------

let socket = null;
const pending = new Map(); // session id -> timer: one refresh per burst of trainer events

function connectEvents() {
  if (socket) { socket.onclose = null; socket.close(); }
  const state = $("#events-state");
  socket = new WebSocket(settings.events);
  socket.onopen = () => { state.dataset.state = "open"; state.textContent = "events: live"; };
  socket.onclose = () => {
    state.dataset.state = "closed"; state.textContent = "events: reconnecting";
    setTimeout(connectEvents, 2000);
  };
  socket.onmessage = (message) => {
    const { event, data } = JSON.parse(message.data);
    if (event.startsWith("job_")) onJobEvent(event, data);
    else if (event === "server_status") onServerStatus(data);
    else if (event.startsWith("trainer_") && data.id && !pending.has(data.id)) {
      pending.set(data.id, setTimeout(() => { pending.delete(data.id); refreshOneSession(data.id); }, 300));
    }
  };
}

// ---- start -------------------------------------------------------------------------------

function every(ms, work) {
  const run = () => work().catch((e) => console.warn(e.message)).finally(() => setTimeout(run, ms));
  run();
}

setupForm();
connectEvents();
every(POLL_MS, refreshSessions);
every(POLL_MS, refreshQueue);
every(5000, refreshModels);
