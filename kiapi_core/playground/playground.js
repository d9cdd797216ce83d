// The kiapi playground: plain JS against the public API, no framework, no build step.
//
// Every call carries "Authorization: Bearer <key>" from the key field (kept in localStorage)
// when one is given. That is also why job events are read with fetch() streaming instead of
// EventSource, and images are fetched into blob: URLs instead of <img src>: neither
// EventSource nor <img> can send a header.

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
};

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
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
    try {
      const body = await response.json();
      message = describe(body.detail ?? body.error?.message ?? body);
    } catch { /* not JSON: keep the status line */ }
    if (response.status === 401) message = "The server needs its API key: enter it above. " + message;
    throw new ApiError(response.status, message);
  }
  return response;
}

const getJson = async (path) => (await api(path)).json();

function postJson(path, body) {
  return api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
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
async function followEvents(jobId, onJob, signal) {
  const response = await api(`/v1/jobs/${jobId}/events`, { headers: { Accept: "text/event-stream" }, signal });
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
      }
      if (!data.length) continue; // retry hint or keep-alive comment
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

function deref(doc, schema) {
  while (schema && schema.$ref) {
    const [section, name] = schema.$ref.split("/").slice(-2);
    schema = doc.components[section][name];
  }
  return schema || {};
}

// A nullable field is anyOf [{type: T}, {type: "null"}]: its T part, and whether null is allowed.
function simple(doc, schema) {
  schema = deref(doc, schema);
  if (schema.anyOf) {
    const parts = schema.anyOf.map((s) => deref(doc, s));
    const real = parts.filter((s) => s.type !== "null");
    if (real.length === 1) return { ...real[0], nullable: real.length < parts.length, description: schema.description, default: schema.default };
    return { ...schema, type: "mixed" };
  }
  return schema;
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

async function selectCapability() {
  const capability = state.capabilities.find((c) => c.name === $("capability").value);
  state.capability = capability;
  state.operation = operationOf(capability);
  $("capability-description").textContent = capability.description || "";
  if (!state.docs.has(capability.name)) state.docs.set(capability.name, await getJson(capability.openapi));
  const doc = state.docs.get(capability.name);
  const body = doc.paths[state.operation].post.requestBody.content["application/json"].schema;
  const schema = deref(doc, body);
  const properties = schema.properties || {};
  state.promptField = "prompt" in properties
    ? "prompt"
    : (schema.required || []).find((n) => simple(doc, properties[n]).type === "string") || "prompt";
  buildFields(doc, properties, capability);
  $("caption").hidden = !capability.operations.validate;
  checkCaption();
}

function buildFields(doc, properties, capability) {
  const box = $("fields");
  box.replaceChildren(Object.assign(document.createElement("legend"), { textContent: "Options" }));
  for (const [name, raw] of Object.entries(properties)) {
    if (name === state.promptField || HIDDEN_FIELDS.has(name)) continue;
    const field = simple(doc, raw);
    const id = `field-${name}`;
    let input;
    if (field.type === "boolean") {
      const label = Object.assign(document.createElement("label"), { className: "check", title: field.description || "" });
      input = Object.assign(document.createElement("input"), { type: "checkbox", id, checked: Boolean(field.default) });
      input.dataset.field = name;
      input.dataset.kind = "boolean";
      label.append(input, name);
      box.append(label);
      continue;
    }
    if (name === "model" && capability.models.length) {
      input = document.createElement("select");
      input.append(new Option("(default)", ""));
      for (const key of capability.models) input.append(new Option(key.split("/").pop(), key.split("/").pop()));
    } else if (field.enum) {
      input = document.createElement("select");
      if (field.nullable || field.default === undefined) input.append(new Option("(default)", ""));
      for (const choice of field.enum) input.append(new Option(choice, choice));
      if (field.default !== undefined && field.default !== null) input.value = field.default;
    } else if (field.type === "integer" || field.type === "number") {
      input = Object.assign(document.createElement("input"), { type: "number" });
      if (field.type === "integer") input.step = "1";
      else input.step = "any";
      if (field.minimum !== undefined) input.min = field.minimum;
      if (field.maximum !== undefined) input.max = field.maximum;
      if (field.default !== undefined && field.default !== null) input.value = field.default;
      else input.placeholder = name === "seed" ? "random" : "default";
    } else if (field.type === "string") {
      input = Object.assign(document.createElement("input"), { type: "text", placeholder: "default" });
      if (field.default) input.value = field.default;
    } else {
      continue; // objects and arrays have no simple control
    }
    input.id = id;
    input.dataset.field = name;
    input.dataset.kind = field.type;
    const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: name, title: field.description || "" });
    const cell = document.createElement("div");
    cell.append(label, input);
    box.append(cell);
  }
}

function promptValue() {
  const text = $("prompt").value;
  if (text.trim().startsWith("{")) {
    try {
      const parsed = JSON.parse(text);
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) return parsed;
    } catch { /* sent as text; the caption check reports the JSON error */ }
  }
  return text;
}

function requestBody() {
  const body = { [state.promptField]: promptValue(), mode: "async" };
  for (const input of $("fields").querySelectorAll("[data-field]")) {
    const name = input.dataset.field;
    if (input.type === "checkbox") body[name] = input.checked;
    else if (input.value !== "") {
      body[name] = input.dataset.kind === "integer" || input.dataset.kind === "number" ? Number(input.value) : input.value;
    }
  }
  return body;
}

// -- live caption check -------------------------------------------------------------------
let captionSeq = 0;
const checkCaption = debounce(async () => {
  const validate = state.capability?.operations.validate;
  if (!validate) return;
  const box = $("caption");
  const prompt = promptValue();
  const seq = ++captionSeq;
  if (!String(typeof prompt === "string" ? prompt : "x").trim()) {
    box.className = "caption";
    $("caption-status").textContent = "Caption check: type a prompt.";
    $("warnings").replaceChildren();
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
    $("warnings").replaceChildren(...warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
  } catch (err) {
    if (seq !== captionSeq) return;
    box.className = "caption warn";
    $("caption-status").textContent = `Caption check failed: ${err.message}`;
    $("warnings").replaceChildren();
  }
}, 350);

// -- running a job ------------------------------------------------------------------------
function showProgress(job) {
  const fraction = job.status === "succeeded" ? 1 : Math.min(Math.max(job.progress || 0, 0), 1);
  $("progress").value = fraction;
  const label = job.status === "queued" && job.queue_position ? `queued, position ${job.queue_position}` : job.progress_label || job.status;
  $("progress-text").textContent = `${(fraction * 100).toFixed(1)}% · ${label}`;
  $("job-status").textContent = `${job.id}: ${job.status}${job.error ? ` — ${job.error}` : ""}`;
  $("job-status").dataset.status = job.status;
}

function setRunning(running) {
  $("submit").disabled = running;
  $("cancel").disabled = !running;
}

async function submit(event) {
  event.preventDefault();
  showError("");
  $("result").hidden = true;
  setRunning(true);
  try {
    const accepted = await (await postJson(state.operation, requestBody())).json();
    state.jobId = accepted.job_id;
    showProgress({ id: accepted.job_id, status: accepted.status, progress: 0, progress_label: "queued" });
    refreshJobs();
    const job = await follow(accepted.job_id);
    if (job.status === "succeeded") await showResult(job);
    else if (job.status === "failed") showError(`The job failed: ${job.error}`);
  } catch (err) {
    showError(err.message);
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
      await followEvents(jobId, (snapshot) => { job = snapshot; showProgress(snapshot); }, state.abort.signal);
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
  if (isImage) $("result-image").src = url;
  else $("result-text").textContent = await (await api(`/v1/files/${fileId}/download`)).text();
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
  $("prompt").addEventListener("input", checkCaption);
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("refresh").addEventListener("click", refreshJobs);
  loadServer();
  loadCapabilities();
  setInterval(() => { if (!state.jobId) refreshJobs(); }, 10000);
}

start();
