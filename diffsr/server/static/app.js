// diffsr web page: builds the option controls from GET /api/methods, submits jobs, follows their
// event streams, and shows before/after. Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const RECENT_KEY = "diffsr.recentJobs";
const RECENT_MAX = 20;
const BROWSER_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP"];

const state = { methods: [], file: null, fileUrl: null, job: null, events: null };

// ----------------------------------------------------------------------------------- helpers

function label(name) {
  return name.replace(/_/g, " ");
}

function types(schema) {
  return Array.isArray(schema.type) ? schema.type : [schema.type];
}

async function api(path, init) {
  const response = await fetch(path, init);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const error = new Error(describe(response, body));
    error.status = response.status;
    error.body = body;
    throw error;
  }
  return body;
}

function describe(response, body) {
  const retry = response.headers.get("Retry-After");
  let text = `${response.status} ${response.statusText}`;
  if (body && typeof body.detail === "string") text = body.detail;
  else if (body && Array.isArray(body.detail)) text = body.detail.map((d) => d.msg).join("\n");
  if (retry) text += ` (retry in ${retry} s)`;
  return text;
}

function setProgress(fraction) {
  // null: busy for an unknown time (loading, queued); else 0..1
  const bar = $("progress");
  bar.classList.toggle("busy", fraction === null);
  const percent = fraction === null ? 0 : Math.round(fraction * 100);
  bar.style.setProperty("--done", `${percent}%`);
  bar.setAttribute("aria-valuenow", String(percent));
  bar.dataset.value = fraction === null ? "" : String(fraction);
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

// ----------------------------------------------------------------------------------- options

function control(name, schema) {
  const kinds = types(schema);
  const nullable = kinds.includes("null");
  const wrap = document.createElement("div");
  wrap.className = "field";
  wrap.dataset.option = name;
  const id = "opt-" + name;
  const title = document.createElement("label");
  title.htmlFor = id;
  title.textContent = label(name);
  let input;
  if (schema.enum) {
    input = document.createElement("select");
    for (const value of schema.enum) {
      const option = document.createElement("option");
      option.value = JSON.stringify(value);
      option.textContent = value === null ? "auto" : String(value);
      option.selected = value === schema.default;
      input.appendChild(option);
    }
    input.readValue = () => JSON.parse(input.value);
  } else if (kinds.includes("boolean")) {
    wrap.classList.add("check");
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(schema.default);
    input.readValue = () => input.checked;
  } else if (kinds.includes("integer") || kinds.includes("number")) {
    input = document.createElement("input");
    input.type = "number";
    input.step = kinds.includes("integer") ? "1" : "any";
    if (schema.minimum !== undefined) input.min = schema.minimum;
    if (schema.maximum !== undefined) input.max = schema.maximum;
    if (schema.default !== null && schema.default !== undefined) input.value = schema.default;
    if (nullable) input.placeholder = "auto";
    input.readValue = () => (input.value === "" ? (nullable ? null : schema.default) : Number(input.value));
  } else {
    input = document.createElement(/prompt/.test(name) ? "textarea" : "input");
    if (input.tagName === "INPUT") input.type = "text";
    input.value = schema.default ?? "";
    if (nullable) input.placeholder = "none";
    input.readValue = () => (input.value === "" && nullable ? null : input.value);
  }
  input.id = id;
  input.name = name;
  input.addEventListener("input", () => wrap.classList.remove("invalid"));
  const help = document.createElement("p");
  help.className = "help";
  const range = schema.minimum !== undefined ? ` [${schema.minimum}${schema.maximum !== undefined ? ".." + schema.maximum : "+"}]` : "";
  help.textContent = (schema.description || "") + range;
  if (input.type === "checkbox") {
    title.prepend(input);
    wrap.append(title, help);
  } else {
    wrap.append(title, input, help);
  }
  wrap.readValue = input.readValue;
  wrap.defaultValue = schema.default;
  return wrap;
}

function buildOptions() {
  const method = state.methods.find((m) => m.name === $("method").value);
  const form = $("options");
  form.replaceChildren();
  if (!method) return;
  $("method-summary").textContent = `${method.summary} — licence: ${method.licence}`;
  const groups = { load: ["Model", []], run: ["Settings", []] };
  for (const [name, schema] of Object.entries(method.options.properties)) {
    (groups[schema.stage] || groups.run)[1].push(control(name, schema));
  }
  for (const [title, fields] of Object.values(groups)) {
    if (!fields.length) continue;
    const set = document.createElement("fieldset");
    const legend = document.createElement("legend");
    legend.textContent = title;
    set.append(legend, ...fields);
    form.appendChild(set);
  }
}

function readOptions() {
  const values = { method: $("method").value, output_format: $("output-format").value };
  for (const field of $("options").querySelectorAll(".field[data-option]")) {
    const value = field.readValue();
    if (value !== field.defaultValue) values[field.dataset.option] = value;
  }
  return values;
}

function markInvalid(body) {
  if (!body || !Array.isArray(body.detail)) return;
  for (const item of body.detail) {
    const name = item.loc && item.loc[2];
    const field = name && $("options").querySelector(`.field[data-option="${CSS.escape(name)}"]`);
    if (field) field.classList.add("invalid");
  }
}

// ---------------------------------------------------------------------------------- the file

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  if (state.fileUrl) URL.revokeObjectURL(state.fileUrl);
  state.fileUrl = URL.createObjectURL(file);
  $("thumb").src = state.fileUrl;
  $("thumb").hidden = false;
  $("drop-text").textContent = `${file.name} (${Math.round(file.size / 1024)} KiB) — drop another to replace`;
  $("start").disabled = false;
  showError("");
}

function setUpDrop() {
  const drop = $("drop");
  $("file").addEventListener("change", () => chooseFile($("file").files[0]));
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const kind of ["dragleave", "drop"]) {
    drop.addEventListener(kind, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => { e.preventDefault(); chooseFile(e.dataTransfer.files[0]); });
  // a file dropped beside the zone must not navigate away from the page
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
}

// ------------------------------------------------------------------------------------- jobs

async function start() {
  if (!state.file) return;
  showError("");
  for (const field of document.querySelectorAll(".invalid")) field.classList.remove("invalid");
  const form = new FormData();
  form.append("image", state.file, state.file.name);
  form.append("options", JSON.stringify(readOptions()));
  $("start").disabled = true;
  try {
    const accepted = await api("/api/jobs", { method: "POST", body: form });
    remember({ id: accepted.id, name: state.file.name, created: Date.now() / 1000 });
    follow(accepted.id, state.fileUrl);
  } catch (error) {
    markInvalid(error.body);
    showError(error.message);
    $("start").disabled = false;
  }
}

function follow(id, beforeUrl) {
  if (state.events) state.events.close();
  state.job = { id, beforeUrl };
  $("progress-box").hidden = false;
  setProgress(0);
  $("status").textContent = "submitted";
  $("cancel").hidden = false;
  const events = new EventSource(`/api/jobs/${id}/events`);
  state.events = events;
  events.addEventListener("status", (e) => update(JSON.parse(e.data)));
  events.addEventListener("gone", () => { events.close(); $("status").textContent = "the job is gone (expired or deleted)"; });
  events.onerror = () => {
    // the server closes the stream when the job finishes; any other drop: ask once, then decide
    if (events.readyState === EventSource.CLOSED) refresh(id);
  };
}

async function refresh(id) {
  try { update(await api(`/api/jobs/${id}`)); } catch (error) { showError(error.message); }
}

function update(job) {
  if (!state.job || job.id !== state.job.id) return;
  let text = job.state;
  if (job.state === "queued") {
    setProgress(null);
    text = job.queue_position ? `queued (position ${job.queue_position})` : "queued";
  } else if (job.state === "running") {
    setProgress(job.total ? job.progress : null);
    text = `running: ${job.stage || "starting"}` + (job.total ? ` ${job.done}/${job.total}` : "");
    if (job.cancel_requested) text += " (cancelling…)";
  } else {
    const bar = $("progress");
    setProgress(job.state === "done" ? 1 : Number(bar.dataset.value || 0));
    if (job.error) text += `: ${job.error}`;
  }
  $("status").textContent = text;
  refreshRecentItem(job);
  if (["done", "failed", "cancelled"].includes(job.state)) {
    if (state.events) { state.events.close(); state.events = null; }
    $("cancel").hidden = true;
    $("start").disabled = !state.file;
    if (job.state === "done") show(job, state.job.beforeUrl || job.input.url);
    else showError(job.state === "failed" ? `job failed: ${job.error}` : "");
  }
}

async function cancel() {
  if (!state.job) return;
  try { update(await api(`/api/jobs/${state.job.id}`, { method: "DELETE" })); } catch (error) { showError(error.message); }
}

// ------------------------------------------------------------------------------ comparison

function show(job, beforeUrl) {
  const result = job.result;
  const after = $("after");
  const before = $("before");
  const previewable = BROWSER_FORMATS.includes(result.format);
  after.src = previewable ? `${result.url}?v=${job.finished}` : "";
  before.src = beforeUrl;
  after.dataset.width = result.width;
  after.dataset.height = result.height;
  $("compare").hidden = !previewable;
  $("placeholder").hidden = previewable;
  if (!previewable) $("placeholder").textContent = `${result.format} cannot be shown by a browser; download it.`;
  $("sizes").textContent = `${job.input.width}×${job.input.height} → ${result.width}×${result.height}`;
  const link = $("download");
  link.href = result.url;
  link.download = "";
  link.hidden = false;
  applyZoom();
}

function applyZoom() {
  const compare = $("compare");
  const zoom = $("zoom").value;
  const width = Number($("after").dataset.width || 0);
  const panes = $("mode").value === "side" ? 2 : 1;
  compare.style.width = zoom === "fit" || !width ? "100%" : `${width * Number(zoom) * panes}px`;
  compare.className = `compare ${$("mode").value}`;
  $("split").hidden = $("mode").value !== "slider";
}

function applySplit() {
  $("compare").style.setProperty("--split", `${$("split").value}%`);
}

// ----------------------------------------------------------------------------- recent jobs

function recentJobs() {
  try { return JSON.parse(localStorage.getItem(RECENT_KEY) || "[]"); } catch (e) { return []; }
}

function remember(entry) {
  const jobs = [entry, ...recentJobs().filter((j) => j.id !== entry.id)].slice(0, RECENT_MAX);
  localStorage.setItem(RECENT_KEY, JSON.stringify(jobs));
  renderRecent();
}

function forget(id) {
  localStorage.setItem(RECENT_KEY, JSON.stringify(recentJobs().filter((j) => j.id !== id)));
  renderRecent();
}

function renderRecent() {
  const list = $("recent");
  list.replaceChildren();
  for (const entry of recentJobs()) {
    const item = document.createElement("li");
    item.dataset.id = entry.id;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.name;
    name.title = new Date(entry.created * 1000).toLocaleString();
    const badge = document.createElement("span");
    badge.className = "state";
    badge.textContent = "…";
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "open";
    open.className = "secondary";
    open.disabled = true;
    open.addEventListener("click", () => openRecent(entry.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.className = "secondary";
    remove.title = "remove from this list";
    remove.addEventListener("click", () => forget(entry.id));
    item.append(name, badge, open, remove);
    list.appendChild(item);
    api(`/api/jobs/${entry.id}`).then(refreshRecentItem).catch((error) => {
      badge.textContent = error.status === 410 || error.status === 404 ? "expired" : "unreachable";
      badge.className = "state expired";
    });
  }
}

const FINAL_STATES = ["done", "failed", "cancelled"];

function refreshRecentItem(job) {
  const item = $("recent").querySelector(`li[data-id="${CSS.escape(job.id)}"]`);
  if (!item) return;
  const badge = item.querySelector(".state");
  // A status fetched before the job finished can arrive after the stream said it finished: a job never
  // leaves a final state, so such a late answer is stale and must not overwrite the badge.
  if (FINAL_STATES.some((s) => badge.classList.contains(s)) && !FINAL_STATES.includes(job.state)) return;
  badge.textContent = job.state === "running" && job.total ? `running ${Math.round(job.progress * 100)}%` : job.state;
  badge.className = `state ${job.state}`;
  item.querySelector("button").disabled = !["done", "queued", "running"].includes(job.state);
}

async function openRecent(id) {
  try {
    const job = await api(`/api/jobs/${id}`);
    state.job = { id, beforeUrl: job.input.url };
    if (job.state === "done") { update(job); } else { follow(id, job.input.url); }
  } catch (error) {
    showError(error.message);
  }
}

// -------------------------------------------------------------------------------------- boot

async function boot() {
  setUpDrop();
  $("start").addEventListener("click", start);
  $("cancel").addEventListener("click", cancel);
  $("method").addEventListener("change", buildOptions);
  $("zoom").addEventListener("change", applyZoom);
  $("mode").addEventListener("change", applyZoom);
  $("split").addEventListener("input", applySplit);
  applySplit();
  renderRecent();
  try {
    const info = await api("/api/methods");
    state.methods = info.methods;
    for (const method of info.methods) {
      const option = document.createElement("option");
      option.value = method.name;
      option.textContent = method.name;
      option.selected = method.default;
      $("method").appendChild(option);
    }
    for (const format of info.output_formats) {
      const option = document.createElement("option");
      option.value = format;
      option.textContent = format === "auto" ? "as the input (PNG if not writable)" : format.toUpperCase();
      $("output-format").appendChild(option);
    }
    buildOptions();
    const mb = Math.round(info.limits.max_upload_bytes / 2 ** 20);
    $("health").textContent = `uploads up to ${mb} MiB · queue ${info.limits.max_queue} · ${info.limits.workers} worker(s)`;
    document.body.dataset.ready = "true";
  } catch (error) {
    showError(`cannot reach the server: ${error.message}`);
  }
}

boot();
