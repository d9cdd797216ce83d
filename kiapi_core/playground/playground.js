// The kiapi playground: plain JS against the public API, no framework, no build step.
//
// Every call carries "Authorization: Bearer <key>" from the key field (kept in localStorage)
// when one is given. That is also why job events are read with fetch() streaming instead of
// EventSource, and images are fetched into blob: URLs instead of <img src>: neither
// EventSource nor <img> can send a header.

import { LayoutCanvas } from "./canvas.js";
import { SchemaForm, deref, fieldSpec, markField, showServerErrors } from "./schema_form.js";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "kiapi.playground.key";
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);
// Fields the page sets itself rather than showing as options.
const HIDDEN_FIELDS = new Set(["mode"]);

const state = {
  capabilities: [],
  capability: null,   // the selected entry of GET /v1/capabilities
  operation: null,    // its generate (or run) path
  docs: new Map(),    // capability name -> its OpenAPI document
  promptField: "prompt",
  jobId: null,
  abort: null,        // AbortController of the current event stream
  blobs: new Map(),   // file id -> object URL (thumbnails and results)
  jobsSignature: "",  // what the recent-jobs list shows now
  form: null,         // the SchemaForm of the selected capability
  canvas: null,       // the LayoutCanvas (capabilities with a caption validate operation)
  lastEventId: null,  // of the job's event stream, to resume it where it broke
  preview: { url: null, busy: false, again: false, shown: 0 },
};

class ApiError extends Error {
  constructor(status, message, detail = null) {
    super(message);
    this.status = status;
    this.detail = detail; // the body's "detail", to show on the fields it names
  }
}

// -- HTTP --------------------------------------------------------------------------------
function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const key = $("api-key").value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

function describe(detail) {
  if (Array.isArray(detail)) {
    return detail
      .map((e) => (e && e.msg ? `${(e.loc || []).slice(1).join(".") || "body"}: ${e.msg}` : JSON.stringify(e)))
      .join("\n");
  }
  if (detail && typeof detail === "object") {
    const issues = Array.isArray(detail.issues) ? `\n- ${detail.issues.join("\n- ")}` : "";
    return (detail.msg || JSON.stringify(detail)) + issues;
  }
  return String(detail);
}

// Absolute from the origin: a page opened as user:key@host/playground has credentials in its
// URL, and fetch() refuses URLs that carry credentials, relative ones resolved against it too.
const absolute = (path) => new URL(path, location.origin);

async function api(path, options = {}) {
  const response = await fetch(absolute(path), { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let detail = null;
    try {
      const body = await response.json();
      detail = body.detail ?? null;
      message = describe(body.detail ?? body.error?.message ?? body);
    } catch { /* not JSON: keep the status line */ }
    if (response.status === 401) message = "The server needs its API key: enter it above. " + message;
    throw new ApiError(response.status, message, detail);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();

function postJson(path, body, headers = {}) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json", ...headers },
    body: JSON.stringify(body),
  });
}

async function fileUrl(fileId) {
  if (!state.blobs.has(fileId)) {
    const blob = await (await api(`/v1/files/${fileId}/download`)).blob();
    state.blobs.set(fileId, URL.createObjectURL(blob));
  }
  return state.blobs.get(fileId);
}

// Server-Sent Events read from a fetch() body, so the Authorization header goes along.
// `progress`/`end` carry the Job JSON; `preview` a note that a new preview image is ready.
// Every event's id is kept, so a reopened stream resumes after it (Last-Event-ID).
async function followEvents(jobId, onJob, onPreview, signal) {
  const headers = { Accept: "text/event-stream" };
  if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
  const response = await api(`/v1/jobs/${jobId}/events`, { headers, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r/g, "");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        else if (line.startsWith("id:")) state.lastEventId = line.slice(3).trim();
      }
      if (!data.length) continue; // retry hint or keep-alive comment
      if (event === "preview") {
        onPreview(JSON.parse(data.join("\n")));
        continue;
      }
      const job = JSON.parse(data.join("\n"));
      onJob(job);
      if (event === "end" || TERMINAL.has(job.status)) {
        reader.cancel().catch(() => {});
        return;
      }
    }
  }
}

// -- messages ----------------------------------------------------------------------------
function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

// -- capabilities and the form built from their OpenAPI -----------------------------------
function operationOf(capability) {
  return capability.operations.generate || capability.operations.run || null;
}

async function loadServer() {
  try {
    const health = await (await fetch(absolute("/health"))).json();
    $("server").textContent = `kiapi ${health.version} · ${health.queue.running} running, ${health.queue.waiting} waiting`;
  } catch {
    $("server").textContent = "server unreachable";
  }
}

async function loadCapabilities() {
  showError("");
  const previous = $("capability").value;
  let list;
  try {
    list = (await getJson("/v1/capabilities")).data.filter(operationOf);
  } catch (err) {
    showError(err.message);
    return;
  }
  state.capabilities = list;
  const select = $("capability");
  select.replaceChildren(...list.map((c) => new Option(`${c.title || c.name} (${c.domain}/${c.name})`, c.name)));
  if (!list.length) {
    showError("No capability on this server can generate anything.");
    return;
  }
  if (list.some((c) => c.name === previous)) select.value = previous;
  await selectCapability();
  refreshJobs();
}

// The served OpenAPI document, once: every capability's operations are in it.
async function openapi() {
  if (!state.docs.has("")) state.docs.set("", await getJson("/openapi.json"));
  return state.docs.get("");
}

async function selectCapability() {
  const capability = state.capabilities.find((c) => c.name === $("capability").value);
  state.capability = capability;
  state.operation = operationOf(capability);
  $("capability-description").textContent = capability.description || "";
  const doc = await openapi();
  const body = doc.paths[state.operation].post.requestBody.content["application/json"].schema;
  const schema = deref(doc, body);
  const properties = schema.properties || {};
  const required = schema.required || [];
  state.promptField = "prompt" in properties
    ? "prompt"
    : required.find((n) => fieldSpec(doc, properties[n]).type === "string") || "prompt";
  const prompt = fieldSpec(doc, properties[state.promptField] || {});
  state.promptSpec = prompt;
  $("prompt-label").firstChild.textContent = `${state.promptField} `;
  $("prompt-label").lastChild.hidden = prompt.type !== "mixed";
  $("prompt-hint").textContent = prompt.description || "";
  markField($("prompt"), "");
  const box = $("fields");
  box.replaceChildren(Object.assign(document.createElement("legend"), { textContent: "Options" }));
  state.form = new SchemaForm(box, doc, properties, required, {
    skip: new Set([state.promptField, ...HIDDEN_FIELDS]),
    models: capability.models,
  });
  // The canvas is for captions: a capability that validates them (ideogram4) gets it.
  const hasCanvas = Boolean(capability.operations.validate) && prompt.type === "mixed";
  $("caption").hidden = !capability.operations.validate;
  $("layout").hidden = !hasCanvas;
  if (hasCanvas) {
    for (const side of ["width", "height"]) state.form.input(side)?.addEventListener("input", updateAspect);
    updateAspect();
    readPrompt();
  }
  checkCaption();
}

function updateAspect() {
  const side = (name) => Number(state.form.input(name)?.value) || 0;
  state.canvas.setAspect(side("width"), side("height"));
}

function parsedPrompt() {
  const text = $("prompt").value;
  if (text.trim().startsWith("{")) {
    try {
      const parsed = JSON.parse(text);
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) return parsed;
    } catch { /* sent as text; the caption check reports the JSON error */ }
  }
  return null;
}

function promptValue() {
  if (state.promptSpec?.type === "string") return $("prompt").value;
  return parsedPrompt() ?? $("prompt").value;
}

// The prompt was edited: the boxes follow the JSON (left alone while it does not parse).
function readPrompt() {
  if ($("layout").hidden) return;
  const caption = parsedPrompt();
  if (caption || !$("prompt").value.trim().startsWith("{")) state.canvas.setCaption(caption);
}

// The canvas was edited: it writes the caption out, keys in the verifier's order.
function writePrompt(caption) {
  $("prompt").value = JSON.stringify(caption, null, 2);
  markField($("prompt"), "");
  checkCaption();
}

function clientHeaders() {
  const headers = {};
  const priority = $("priority").value.trim();
  markField($("priority"), "");
  markField($("cancel-after"), "");
  if (priority) {
    const value = Number(priority);
    if (!Number.isInteger(value) || value < -10 || value > 10) {
      markField($("priority"), "priority must be an integer from -10 to 10");
      return null;
    }
    headers["X-Kiapi-Priority"] = String(value);
  }
  const deadline = $("cancel-after").value.trim();
  if (deadline) headers["Cancel-After"] = deadline;
  return headers;
}

// The body, or null when a field is refused in the browser (shown on it).
function requestBody() {
  const fields = state.form.values();
  const prompt = promptValue();
  let ok = fields !== null;
  if (typeof prompt === "string" && !prompt.trim()) {
    markField($("prompt"), `${state.promptField} is required`);
    ok = false;
  } else {
    markField($("prompt"), "");
  }
  return ok ? { [state.promptField]: prompt, ...fields, mode: "async" } : null;
}

// The input a 422's loc names: ["body", field, ...] or ["header", name].
function inputAt(loc) {
  const [where, name] = loc;
  if (where === "header") {
    const header = String(name).toLowerCase();
    if (header === "x-kiapi-priority") return $("priority");
    if (header === "cancel-after") return $("cancel-after");
    return null;
  }
  if (where !== "body") return null;
  if (name === state.promptField) return $("prompt");
  return state.form.input(name);
}

// -- live caption check -------------------------------------------------------------------
let captionSeq = 0;
const checkCaption = debounce(async () => {
  const validate = state.capability?.operations.validate;
  if (!validate) return;
  const box = $("caption");
  const prompt = promptValue();
  const seq = ++captionSeq;
  const show = (warnings) => {
    $("warnings").replaceChildren(...warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
    if (state.canvas) state.canvas.setWarnings(warnings);
  };
  if (!String(typeof prompt === "string" ? prompt : "x").trim()) {
    box.className = "caption";
    $("caption-status").textContent = "Caption check: type a prompt.";
    show([]);
    return;
  }
  try {
    const report = await (await postJson(validate, { prompt })).json();
    if (seq !== captionSeq) return; // a newer check is on its way
    const warnings = report.warnings || [];
    box.className = `caption ${warnings.length ? "warn" : "ok"}`;
    $("caption-status").textContent = warnings.length
      ? `Caption check: ${warnings.length} warning${warnings.length > 1 ? "s" : ""}`
      : `Caption check: no warnings${report.is_json_caption ? " (JSON caption)" : ""}`;
    show(warnings);
  } catch (err) {
    if (seq !== captionSeq) return;
    box.className = "caption warn";
    $("caption-status").textContent = `Caption check failed: ${err.message}`;
    show([]);
  }
}, 350);

// -- running a job ------------------------------------------------------------------------
function seconds(s) {
  s = Math.max(0, Math.round(s));
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
}

// Beside the bar: time left while running, the expected start while queued (when known).
function etaText(job) {
  if (job.status === "running" && typeof job.eta_s === "number") return `ETA ${seconds(job.eta_s)}`;
  if (job.status === "queued" && typeof job.estimated_start_at === "number") {
    return `starts in ~${seconds(job.estimated_start_at - Date.now() / 1000)}`;
  }
  return "";
}

function showProgress(job) {
  const fraction = job.status === "succeeded" ? 1 : Math.min(Math.max(job.progress || 0, 0), 1);
  $("progress").value = fraction;
  const label = job.status === "queued" && job.queue_position ? `queued, position ${job.queue_position}` : job.progress_label || job.status;
  $("progress-text").textContent = `${(fraction * 100).toFixed(1)}% · ${label}`;
  $("eta").textContent = etaText(job);
  $("job-status").textContent = `${job.id}: ${job.status}${job.error ? ` — ${job.error}` : ""}`;
  $("job-status").dataset.status = job.status;
}

function setRunning(running) {
  $("submit").disabled = running;
  $("cancel").disabled = !running;
}

// A preview is ready: fetch the latest (one request at a time; a burst coalesces into one).
async function showPreview(event) {
  const preview = state.preview;
  if (event.job_id !== state.jobId) return;
  if (preview.busy) {
    preview.again = true;
    return;
  }
  preview.busy = true;
  try {
    do {
      preview.again = false;
      const response = await api(`/v1/jobs/${event.job_id}/preview`);
      const url = URL.createObjectURL(await response.blob());
      if (event.job_id !== state.jobId) {
        URL.revokeObjectURL(url); // the job ended meanwhile: its result is showing
        return;
      }
      if (preview.url) URL.revokeObjectURL(preview.url);
      preview.url = url;
      preview.shown += 1;
      if (state.canvas && !$("layout").hidden) state.canvas.setImage(url, "preview");
      else Object.assign($("preview-image"), { src: url, hidden: false });
      $("output").dataset.previews = String(preview.shown);
    } while (preview.again);
  } catch { /* a preview is a nicety: the job goes on without it */ } finally {
    preview.busy = false;
  }
}

async function submit(event) {
  event.preventDefault();
  showError("");
  const headers = clientHeaders();
  const body = requestBody();
  if (!body || !headers) {
    showError("Some fields need fixing (marked in red).");
    $("form").querySelector("[aria-invalid=true]")?.focus();
    return;
  }
  $("result").hidden = true;
  $("preview-image").hidden = true;
  state.preview.shown = 0;
  delete $("output").dataset.previews;
  delete $("output").dataset.previewsBeforeResult;
  if (state.canvas) state.canvas.setImage(null);
  state.lastEventId = null;
  setRunning(true);
  try {
    const accepted = await (await postJson(state.operation, body, headers)).json();
    state.jobId = accepted.job_id;
    showProgress({ id: accepted.job_id, status: accepted.status, progress: 0, progress_label: "queued" });
    refreshJobs();
    const job = await follow(accepted.job_id);
    state.jobId = null; // late previews are dropped from here on
    $("output").dataset.previewsBeforeResult = String(state.preview.shown);
    if (job.status === "succeeded") await showResult(job);
    else if (job.status === "failed") showError(`The job failed: ${job.error}`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 422 && err.detail) {
      const rest = showServerErrors(err.detail, inputAt);
      showError(rest.length ? rest.join("\n") : "The server refused some fields (marked in red).");
    } else {
      showError(err.message);
    }
  } finally {
    state.jobId = null;
    setRunning(false);
    refreshJobs();
  }
}

// The job once terminal. The stream is re-opened if it drops; the job itself is the truth.
async function follow(jobId) {
  let job = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    state.abort = new AbortController();
    try {
      await followEvents(jobId, (snapshot) => { job = snapshot; showProgress(snapshot); }, showPreview, state.abort.signal);
    } catch (err) {
      if (err instanceof ApiError) throw err;
    }
    job = await getJson(`/v1/jobs/${jobId}`);
    showProgress(job);
    if (TERMINAL.has(job.status)) return job;
    await new Promise((r) => setTimeout(r, 1000));
  }
  throw new Error(`lost track of ${jobId}`);
}

async function cancel() {
  if (!state.jobId) return;
  $("cancel").disabled = true;
  try {
    const job = await (await api(`/v1/jobs/${state.jobId}`, { method: "DELETE" })).json();
    showProgress(job);
  } catch (err) {
    showError(err.message);
  }
}

async function showResult(job) {
  const fileId = job.artifacts[0];
  if (!fileId) return;
  const info = await getJson(`/v1/files/${fileId}`);
  const url = await fileUrl(fileId);
  const isImage = info.content_type.startsWith("image/");
  $("result-image").hidden = !isImage;
  $("result-text").hidden = isImage;
  $("preview-image").hidden = true;
  if (isImage) {
    $("result-image").src = url;
    if (state.canvas && !$("layout").hidden) state.canvas.setImage(url, "result");
  } else {
    $("result-text").textContent = await (await api(`/v1/files/${fileId}/download`)).text();
  }
  $("result-download").href = url;
  $("result-download").download = info.filename;
  const params = { job: job.id, ...(job.result?.params || job.params) };
  $("result-params").replaceChildren(...Object.entries(params).flatMap(([k, v]) => [
    Object.assign(document.createElement("dt"), { textContent: k }),
    Object.assign(document.createElement("dd"), { textContent: typeof v === "object" ? JSON.stringify(v) : String(v) }),
  ]));
  $("result").hidden = false;
}

// -- recent jobs --------------------------------------------------------------------------
function promptText(job) {
  const p = job.params?.prompt ?? job.params?.text ?? "";
  return typeof p === "string" ? p : p.high_level_description || JSON.stringify(p);
}

const refreshJobs = debounce(async () => {
  loadServer();
  let jobs, files;
  try {
    [jobs, files] = await Promise.all([getJson("/v1/jobs?limit=12"), getJson("/v1/files?limit=100")]);
  } catch {
    return; // the form shows the error (e.g. a missing key) already
  }
  // Re-render only on a change: no thumbnail flicker, and a card stays put under the pointer.
  const signature = jobs.jobs.map((j) => `${j.id}:${j.status}`).join(",");
  if (signature === state.jobsSignature) return;
  state.jobsSignature = signature;
  const byJob = new Map(files.files.filter((f) => f.job_id).map((f) => [f.job_id, f]));
  const items = jobs.jobs.map((job) => {
    const li = document.createElement("li");
    li.dataset.job = job.id;
    const thumb = Object.assign(document.createElement("div"), { className: "thumb", textContent: job.status });
    const file = byJob.get(job.id);
    if (file && file.content_type.startsWith("image/")) {
      fileUrl(file.id).then((url) => thumb.replaceChildren(Object.assign(document.createElement("img"), { src: url, alt: job.id }))).catch(() => {});
    }
    const when = new Date(job.created_at * 1000).toLocaleTimeString();
    li.append(
      thumb,
      Object.assign(document.createElement("div"), { className: `status-${job.status}`, textContent: `${job.type} · ${job.status} · ${when}` }),
      Object.assign(document.createElement("div"), { className: "prompt", textContent: promptText(job), title: promptText(job) }),
    );
    li.addEventListener("click", async () => {
      const fresh = await getJson(`/v1/jobs/${job.id}`);
      showProgress(fresh);
      if (fresh.status === "succeeded") await showResult(fresh).catch((err) => showError(err.message));
    });
    return li;
  });
  $("jobs").replaceChildren(...items);
}, 200);

// -- start --------------------------------------------------------------------------------
function start() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, key.value.trim());
    loadCapabilities();
  });
  $("capability").addEventListener("change", () => selectCapability().catch((err) => showError(err.message)));
  $("prompt").addEventListener("input", () => {
    markField($("prompt"), "");
    readPrompt();
    checkCaption();
  });
  state.canvas = new LayoutCanvas({ onChange: writePrompt });
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", refreshJobs);
  loadServer();
  loadCapabilities();
  setInterval(() => { if (!state.jobId) refreshJobs(); }, 10000);
}

start();
