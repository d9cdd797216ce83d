// The Jobs page: a live list of jobs with status, progress, ETA, preview and result thumbnails,
// cancel, retry and priority, filters and paging.
//
// Live updates come from the global stream GET /v1/events (`event: job`, Job JSON, resumable
// with Last-Event-ID). A server without that stream answers 404: the page then polls
// GET /v1/jobs and follows each visible unfinished job's own /v1/jobs/{id}/events instead.

import {
  $, ApiError, TERMINAL, absolute, authHeaders, blobUrl, el, formatSeconds, formatTime, getJson,
  loadServer, readEvents, reportError, sendJson, showError, startPage,
} from "/playground/common.js";

const PAGE_SIZE = 20;
const MAX_FOLLOWED = 8;       // per-job streams at once in the fallback
const POLL_MS = 3000;         // the fallback's list refresh
const PREVIEW_MS = 1000;      // at most one preview fetch per running job and second
const MAX_THUMB_BYTES = 8 * 1024 * 1024;

const state = {
  jobs: new Map(),      // id -> Job JSON, the rows shown
  order: [],            // their ids, newest first
  rows: new Map(),      // id -> { tr, signature }
  cursor: null,         // next_cursor of the last page read
  live: null,           // AbortController of the live source (stream or polling)
  lastEventId: null,
  mode: "",             // "stream" or "polling"
  followed: new Map(),  // fallback: id -> AbortController of its /events stream
  previews: new Map(),  // id -> { url, etag, at }
  results: new Map(),   // file id -> { info, url } (url null when not an image)
  errors: new Map(),    // id -> why the last action on it failed
  types: new Set(),
};

const filters = () => ({ type: $("filter-type").value, status: $("filter-status").value });

function query(extra = {}) {
  const params = new URLSearchParams();
  const { type, status } = filters();
  if (type) params.set("type", type);
  if (status) params.set("status", status);
  for (const [k, v] of Object.entries(extra)) if (v !== null && v !== undefined) params.set(k, v);
  const text = params.toString();
  return text ? `?${text}` : "";
}

function matches(job) {
  const { type, status } = filters();
  return (!type || job.type === type) && (!status || job.status === status);
}

function setLive(text) {
  $("live").textContent = text;
}

// -- rendering ---------------------------------------------------------------------------
function promptText(job) {
  const p = job.params?.prompt ?? job.params?.text ?? "";
  return typeof p === "string" ? p : p.high_level_description || JSON.stringify(p);
}

function etaText(job) {
  if (job.status === "running" && typeof job.eta_s === "number") return `~${formatSeconds(job.eta_s)} left`;
  if (job.status === "queued") {
    const parts = [];
    if (job.queue_position) parts.push(`position ${job.queue_position}`);
    if (typeof job.estimated_start_at === "number") {
      parts.push(`starts in ~${formatSeconds(job.estimated_start_at - Date.now() / 1000)}`);
    }
    return parts.join(" · ");
  }
  return "";
}

function thumbContent(job) {
  const fileId = job.artifacts?.[0];
  const result = fileId ? state.results.get(fileId) : null;
  if (result?.url) return el("img", { src: result.url, alt: `result of ${job.id}`, className: "result" });
  if (result) return result.info.content_type;
  const preview = state.previews.get(job.id);
  if (preview?.url && !TERMINAL.has(job.status)) {
    return el("img", { src: preview.url, alt: `preview of ${job.id}`, className: "preview" });
  }
  return job.status;
}

function updateThumb(id) {
  const thumb = state.rows.get(id)?.tr.querySelector(".thumb");
  const job = state.jobs.get(id);
  if (thumb && job) thumb.replaceChildren(thumbContent(job));
}

function actions(job) {
  const out = [];
  if (!TERMINAL.has(job.status)) {
    out.push(el("button", { type: "button", className: "small danger cancel", dataset: { key: "cancel" }, onclick: () => cancel(job.id) }, "Cancel"));
  }
  if ((job.status === "failed" || job.status === "canceled") && !job.retried_by) {
    out.push(el("button", { type: "button", className: "small retry", dataset: { key: "retry" }, onclick: () => retry(job.id) }, "Retry"));
  }
  if (job.status === "queued") {
    const input = el("input", {
      type: "number", min: -10, max: 10, step: 1, value: job.priority ?? 0, className: "priority-value",
      "aria-label": `Priority of ${job.id} (-10..10, higher runs first)`, dataset: { key: "priority" },
    });
    const form = el("form", { className: "priority", novalidate: true },
      input, el("button", { type: "submit", className: "small secondary", dataset: { key: "set-priority" } }, "Set priority"));
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      setPriority(job.id, input.value);
    });
    out.push(form);
  }
  return out;
}

function renderRow(job) {
  const failed = state.errors.get(job.id);
  const links = [];
  if (job.retry_of) links.push(`retry of ${job.retry_of}`);
  if (job.retried_by) links.push(`retried as ${job.retried_by}`);
  const { fraction, percent, label } = progressParts(job);
  const duration = job.started_at && job.finished_at ? job.finished_at - job.started_at : null;
  return el("tr", { dataset: { job: job.id, status: job.status } },
    el("td", { dataset: { label: "Preview" } }, el("div", { className: "thumb" }, thumbContent(job))),
    el("td", { dataset: { label: "Job" } },
      el("code", {}, job.id),
      el("div", { className: "muted" }, `${job.type}${job.priority ? ` · priority ${job.priority}` : ""}`),
      el("div", { className: "prompt", title: promptText(job) }, promptText(job).slice(0, 120)),
      links.length ? el("div", { className: "muted links" }, links.join(" · ")) : null,
      el("details", {}, el("summary", {}, "details"),
        el("pre", {}, JSON.stringify({ params: job.params, result: job.result, error: job.error }, null, 2))),
      failed ? el("p", { className: "row-error" }, failed) : null,
    ),
    el("td", { dataset: { label: "Status" } },
      el("span", { className: `badge status status-${job.status}` }, job.status),
      job.error ? el("div", { className: "row-error" }, job.error) : null,
    ),
    el("td", { dataset: { label: "Progress" } },
      el("progress", { max: 1, value: fraction, "aria-label": `progress of ${job.id}` }),
      el("span", { className: "percent" }, percent),
      el("div", { className: "muted label" }, label),
      el("div", { className: "eta" }, etaText(job)),
    ),
    el("td", { dataset: { label: "Created" } },
      formatTime(job.created_at),
      duration !== null ? el("div", { className: "muted" }, `ran ${formatSeconds(duration)}`) : null,
    ),
    el("td", { className: "actions", dataset: { label: "Actions" } }, ...actions(job)),
  );
}

// What changes many times a second is updated in place: a row rebuilt under the pointer would
// swallow a click on its Cancel button.
const MOVING = { progress: 0, progress_label: "", eta_s: null, estimated_start_at: null, queue_position: null };

function progressParts(job) {
  const fraction = job.status === "succeeded" ? 1 : Math.min(Math.max(job.progress || 0, 0), 1);
  return { fraction, percent: ` ${(fraction * 100).toFixed(0)}%`, label: job.progress_label || "" };
}

function updateProgress(tr, job) {
  const { fraction, percent, label } = progressParts(job);
  tr.querySelector("progress").value = fraction;
  tr.querySelector(".percent").textContent = percent;
  tr.querySelector(".label").textContent = label;
  tr.querySelector(".eta").textContent = etaText(job);
}

// A rebuilt row keeps the keyboard focus (and a half-typed priority) where it was.
function swapRow(old, tr) {
  const active = document.activeElement;
  const key = old.contains(active) ? active.dataset.key : null;
  const typed = key === "priority" ? active.value : null;
  old.replaceWith(tr);
  if (!key) return;
  const again = tr.querySelector(`[data-key="${key}"]`);
  if (!again) return;
  if (typed !== null) again.value = typed;
  again.focus();
}

function render() {
  const body = $("jobs").tBodies[0];
  let previous = null;
  for (const id of state.order) {
    const job = state.jobs.get(id);
    const signature = JSON.stringify([{ ...job, ...MOVING }, state.errors.get(id)]);
    let entry = state.rows.get(id);
    if (!entry || entry.signature !== signature) {
      const tr = renderRow(job);
      if (entry) swapRow(entry.tr, tr);
      entry = { tr, signature };
      state.rows.set(id, entry);
    } else {
      updateProgress(entry.tr, job);
    }
    if (entry.tr.previousElementSibling !== previous || entry.tr.parentNode !== body) {
      if (previous) previous.after(entry.tr);
      else body.prepend(entry.tr);
    }
    previous = entry.tr;
  }
  for (const [id, entry] of state.rows) {
    if (!state.jobs.has(id)) {
      entry.tr.remove();
      state.rows.delete(id);
    }
  }
  $("jobs-empty").hidden = state.order.length > 0;
  $("more").hidden = !state.cursor;
}

// -- the data ----------------------------------------------------------------------------
// A job from a page, a stream or an action's answer. Known rows always update (a filtered
// status shows how the job went on); a new job joins when it matches the filters.
function upsert(job, { render: now = true } = {}) {
  if (!job || !job.id) return;
  const known = state.jobs.has(job.id);
  if (!known && !matches(job)) return;
  const before = state.jobs.get(job.id);
  // Events may overtake a page read: never go back from a terminal state.
  if (before && TERMINAL.has(before.status) && !TERMINAL.has(job.status)) return;
  state.jobs.set(job.id, job);
  if (!known) {
    const at = state.order.findIndex((id) => state.jobs.get(id).created_at < job.created_at);
    if (at < 0) {
      // Older than every row: it belongs to a later page unless this is the last one.
      if (state.cursor) {
        state.jobs.delete(job.id);
        return;
      }
      state.order.push(job.id);
    } else {
      state.order.splice(at, 0, job.id);
    }
  }
  if (!state.types.has(job.type)) addType(job.type);
  if (job.status === "running") fetchPreview(job.id);
  if (job.status === "succeeded" && job.artifacts?.length) fetchResult(job);
  if (state.mode === "polling") followSome();
  if (now) render();
}

async function loadPage(cursor = null) {
  const page = await getJson(`/v1/jobs${query({ limit: PAGE_SIZE, cursor })}`);
  state.cursor = page.next_cursor;
  for (const job of page.jobs) {
    if (!state.jobs.has(job.id)) state.order.push(job.id);
    state.jobs.set(job.id, job);
    if (!state.types.has(job.type)) addType(job.type);
    if (job.status === "succeeded" && job.artifacts?.length) fetchResult(job);
    if (job.status === "running") fetchPreview(job.id);
  }
  render();
}

async function fetchResult(job) {
  const fileId = job.artifacts[0];
  if (state.results.has(fileId)) return;
  state.results.set(fileId, null);
  try {
    const info = await getJson(`/v1/files/${fileId}`);
    const image = info.content_type.startsWith("image/") && info.bytes <= MAX_THUMB_BYTES;
    const url = image ? await blobUrl(`/v1/files/${fileId}/download`, fileId) : null;
    state.results.set(fileId, { info, url });
    updateThumb(job.id);
  } catch {
    state.results.delete(fileId); // gone (deleted) or not readable now: try again later
  }
}

// The latest live preview of a running job (GET /v1/jobs/{id}/preview; 404 = none yet).
// Conditional on its ETag, so an unchanged preview costs a 304.
async function fetchPreview(id) {
  const seen = state.previews.get(id) || { url: null, etag: null, at: 0 };
  const now = Date.now();
  if (now - seen.at < PREVIEW_MS) return;
  seen.at = now;
  state.previews.set(id, seen);
  try {
    const headers = authHeaders(seen.etag ? { "If-None-Match": seen.etag } : {});
    const response = await fetch(absolute(`/v1/jobs/${id}/preview`), { headers });
    if (response.status === 404) seen.at = now + 2 * PREVIEW_MS; // none yet: ask less often
    if (response.status !== 200) return; // 304 unchanged, 404 none yet
    const blob = await response.blob();
    if (seen.url) URL.revokeObjectURL(seen.url);
    seen.url = URL.createObjectURL(blob);
    seen.etag = response.headers.get("ETag");
    updateThumb(id);
  } catch { /* the next progress event tries again */ }
}

function addType(type) {
  state.types.add(type);
  const select = $("filter-type");
  if (![...select.options].some((o) => o.value === type)) select.append(new Option(type, type));
}

async function loadTypes() {
  try {
    for (const cap of (await getJson("/v1/capabilities")).data) addType(cap.name);
  } catch { /* the list's own error says why */ }
}

// -- live updates ------------------------------------------------------------------------
const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

async function stream(signal) {
  // Status is filtered here, not by the server: a shown job's later changes must arrive.
  const type = filters().type;
  const path = `/v1/events${type ? `?type=${encodeURIComponent(type)}` : ""}`;
  while (!signal.aborted) {
    try {
      await readEvents(path, (kind, data, id) => {
        if (id) state.lastEventId = id;
        if (kind === "job") upsert(data);
        else if (kind === "reset") reload(); // resumed too late: the stream starts over
        return signal.aborted;
      }, { signal, lastEventId: state.lastEventId, onOpen: () => setLive("live") });
    } catch (err) {
      if (signal.aborted) return;
      if (err instanceof ApiError && (err.status === 404 || err.status === 405)) {
        poll(signal); // a server without the global stream
        return;
      }
      if (err instanceof ApiError && err.status === 401) {
        setLive("");
        showError(err.message);
        return;
      }
    }
    if (signal.aborted) return;
    setLive("reconnecting…");
    await sleep(2000, signal);
  }
}

async function poll(signal) {
  state.mode = "polling";
  setLive("polling");
  while (!signal.aborted) {
    try {
      // The newest rows again; older pages are left as read.
      const page = await getJson(`/v1/jobs${query({ limit: Math.min(Math.max(state.order.length, PAGE_SIZE), 100) })}`);
      for (const job of page.jobs) upsert(job, { render: false });
      // Shown jobs that left the filtered list (e.g. a queued one that ran) are read one by one.
      const listed = new Set(page.jobs.map((j) => j.id));
      const stale = state.order.filter((id) => !listed.has(id) && !TERMINAL.has(state.jobs.get(id).status));
      for (const job of await Promise.all(stale.map((id) => getJson(`/v1/jobs/${id}`).catch(() => null)))) {
        upsert(job, { render: false });
      }
      render();
      followSome();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) showError(err.message);
    }
    await sleep(POLL_MS, signal);
  }
}

// Fallback only: each unfinished job on screen (a few at most) followed on its own stream.
function followSome() {
  for (const id of state.order) {
    if (state.followed.size >= MAX_FOLLOWED) break;
    const job = state.jobs.get(id);
    if (TERMINAL.has(job.status) || state.followed.has(id)) continue;
    const abort = new AbortController();
    state.followed.set(id, abort);
    state.live?.signal.addEventListener("abort", () => abort.abort(), { once: true });
    readEvents(`/v1/jobs/${id}/events`, (kind, data) => {
      if (data?.id === id) upsert(data); // `preview` events carry no Job
      return kind === "end" || TERMINAL.has(data?.status);
    }, { signal: abort.signal })
      .catch(() => {})
      .finally(() => state.followed.delete(id));
  }
}

function startLive() {
  state.live?.abort();
  state.live = new AbortController();
  state.mode = "stream";
  state.lastEventId = null;
  stream(state.live.signal);
}

async function reload() {
  state.live?.abort();
  state.jobs.clear();
  state.order = [];
  state.cursor = null;
  state.errors.clear();
  try {
    await loadPage();
    showError("");
  } catch (err) {
    render();
    setLive("");
    showError(err.message);
    return;
  }
  startLive();
}

// -- actions -----------------------------------------------------------------------------
async function act(id, what) {
  state.errors.delete(id);
  showError("");
  try {
    await what();
  } catch (err) {
    state.errors.set(id, err.message);
    reportError(null, err);
  }
  render();
}

const cancel = (id) => act(id, async () => upsert(await sendJson("DELETE", `/v1/jobs/${id}`)));

const retry = (id) => act(id, async () => {
  const fresh = await sendJson("POST", `/v1/jobs/${id}/retry`);
  upsert(fresh);
  upsert(await getJson(`/v1/jobs/${id}`)); // now linked: retried_by
});

const setPriority = (id, value) => act(id, async () => {
  const priority = Number(value);
  if (value === "" || !Number.isInteger(priority) || priority < -10 || priority > 10) {
    throw new Error("priority: must be a whole number from -10 to 10");
  }
  upsert(await sendJson("PATCH", `/v1/jobs/${id}`, { priority }));
});

// -- start -------------------------------------------------------------------------------
$("filters").addEventListener("change", reload);
$("filters").addEventListener("submit", (event) => event.preventDefault());
$("refresh").addEventListener("click", () => { loadServer(); reload(); });
$("more").addEventListener("click", async () => {
  try {
    await loadPage(state.cursor);
  } catch (err) {
    showError(err.message);
  }
});
// Previews of running jobs also between progress events; ETAs count down.
setInterval(() => {
  for (const id of state.order) if (state.jobs.get(id).status === "running") fetchPreview(id);
  for (const [id, entry] of state.rows) {
    const eta = entry.tr.querySelector(".eta");
    if (eta) eta.textContent = etaText(state.jobs.get(id));
  }
}, PREVIEW_MS);
setInterval(loadServer, 10000);
startPage(() => { loadTypes(); reload(); });
