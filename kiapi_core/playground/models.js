// The Models page: every plugin's models from GET /v1/models (with /v1/capabilities and
// /health): activation (and the exact `kiapi activate` command), residency, loads, memory,
// and Warm / Unload where the server has POST /v1/models/{id}/load and
// DELETE /v1/models/{id}/resident (found in its OpenAPI document, so an older server simply
// shows no buttons).

import {
  $, ApiError, TERMINAL, el, getJson, loadServer, readEvents, reportError, sendJson, showError,
  startPage, copyText, formatSeconds, formatTime,
} from "/playground/common.js";

const state = {
  rows: new Map(),      // model id -> { tr, signature }
  canLoad: false,       // the server documents POST /v1/models/{id}/load
  canUnload: false,     // ... and DELETE /v1/models/{id}/resident
  busy: new Map(),      // model id -> what an action in flight says ("warming 40%")
  errors: new Map(),    // model id -> why its last action failed (shown in its row)
  models: [],
  loadFailed: false,
};

// A model id may span several path parameters (/v1/models/{family}/{name}/load).
const LOAD = /^\/v1\/models\/(\{[^}]+\}\/)+load$/;
const RESIDENT = /^\/v1\/models\/(\{[^}]+\}\/)+resident$/;

// A model id is family/name: each part is one URL segment.
const modelPath = (id, action) => `/v1/models/${id.split("/").map(encodeURIComponent).join("/")}/${action}`;

async function findEndpoints() {
  try {
    const paths = Object.entries((await getJson("/openapi.json")).paths);
    state.canLoad = paths.some(([p, item]) => LOAD.test(p) && item.post);
    state.canUnload = paths.some(([p, item]) => RESIDENT.test(p) && item.delete);
  } catch {
    state.canLoad = state.canUnload = false;
  }
}

function expiresText(model) {
  if (!model.resident || !("expires_at" in model)) return "";
  if (model.expires_at === null) return "kept until unloaded";
  const left = model.expires_at - Date.now() / 1000;
  return left > 0 ? `idle unload in ${formatSeconds(left)}` : "idle unload due";
}

function commandBlock(command) {
  const status = el("span", { className: "muted", role: "status" });
  const button = el("button", {
    type: "button",
    className: "small secondary copy",
    "aria-label": `Copy the command ${command}`,
    onclick: async () => {
      status.textContent = (await copyText(command)) ? "copied" : "select and copy it";
    },
  }, "Copy");
  return el("div", { className: "command" }, el("code", { className: "activate" }, command), button, status);
}

function actionButtons(model) {
  const out = [];
  const busy = state.busy.get(model.id);
  if (state.canLoad) {
    out.push(el("button", {
      type: "button",
      className: "small warm",
      disabled: Boolean(busy) || !model.active || model.resident,
      title: !model.active ? "activate its weights first" : model.resident ? "already in memory" : "load it now",
      onclick: () => warm(model),
    }, "Warm"));
  }
  if (state.canUnload) {
    out.push(el("button", {
      type: "button",
      className: "small danger unload",
      disabled: Boolean(busy) || !model.resident,
      title: model.resident ? "unload it now" : "not in memory",
      onclick: () => unload(model),
    }, "Unload"));
  }
  if (busy) out.push(el("span", { className: "muted busy", role: "status" }, busy));
  if (!out.length) out.push(el("span", { className: "muted" }, "—"));
  return out;
}

function renderRow(model, capabilities) {
  const failed = state.errors.get(model.id);
  const rowError = failed ? el("p", { className: "row-error" }, failed) : null;
  const caps = capabilities.filter((c) => c.models.includes(model.id)).map((c) => c.name);
  const nameCell = el("td", { dataset: { label: "Model" } },
    el("strong", {}, model.id),
    model.default ? el("span", { className: "badge" }, " default") : null,
    el("div", { className: "muted" }, `plugin ${model.owned_by}${caps.length ? ` · ${caps.join(", ")}` : ""}`),
    el("div", { className: "chips" }, ...model.features.map((f) => el("span", { className: "chip" }, f))),
    rowError,
  );
  const weights = el("td", { dataset: { label: "Weights" } },
    model.active
      ? el("span", { className: "badge good" }, "active")
      : el("span", { className: "badge bad" }, "not activated"),
    model.active ? null : commandBlock(model.activate_command || `kiapi activate ${model.family}`),
  );
  const resident = el("td", { dataset: { label: "In memory" } },
    el("span", { className: `badge${model.resident ? " good" : ""}` }, model.resident ? "resident" : "not loaded"),
    el("div", { className: "muted expires", title: model.expires_at ? formatTime(model.expires_at) : "" }, expiresText(model)),
  );
  const loads = el("td", { dataset: { label: "Loads" } },
    String(model.loads), model.transient_loads ? el("span", { className: "muted" }, ` (+${model.transient_loads} transient)`) : null);
  const memory = el("td", { dataset: { label: "Memory" } }, `${model.memory_gb} GB`);
  const actions = el("td", { className: "actions", dataset: { label: "Actions" } }, ...actionButtons(model));
  return el("tr", { dataset: { model: model.id } }, nameCell, weights, resident, loads, memory, actions);
}

async function refresh() {
  let models, capabilities;
  try {
    [models, capabilities] = await Promise.all([getJson("/v1/models"), getJson("/v1/capabilities")]);
  } catch (err) {
    state.loadFailed = true;
    showError(err.message);
    return;
  }
  // Only a failed load's message goes away by itself; an action's stays until the next one.
  if (state.loadFailed) showError("");
  state.loadFailed = false;
  state.models = models.data;
  const body = $("models").tBodies[0];
  const seen = new Set();
  let previous = null;
  for (const model of models.data) {
    seen.add(model.id);
    // A row is rebuilt only when it changed, so focus and a "copied" note stay put.
    const signature = JSON.stringify([
      model, state.busy.get(model.id), state.errors.get(model.id), state.canLoad, state.canUnload,
    ]);
    let entry = state.rows.get(model.id);
    if (!entry || entry.signature !== signature) {
      const tr = renderRow(model, capabilities.data);
      if (entry) entry.tr.replaceWith(tr);
      entry = { tr, signature };
      state.rows.set(model.id, entry);
    }
    if (entry.tr.previousElementSibling !== previous || entry.tr.parentNode !== body) {
      if (previous) previous.after(entry.tr);
      else body.prepend(entry.tr);
    }
    previous = entry.tr;
  }
  for (const [id, entry] of state.rows) {
    if (!seen.has(id)) {
      entry.tr.remove();
      state.rows.delete(id);
    }
  }
  $("models-empty").hidden = models.data.length > 0;
  const health = await loadServer();
  if (health?.models) {
    const m = health.models;
    $("memory").textContent = `${m.resident} resident · ${m.memory_gb_used} of ${m.memory_gb_limit} GB of the memory budget in use`;
  }
}

function tickExpiry() {
  for (const model of state.models) {
    const cell = state.rows.get(model.id)?.tr.querySelector(".expires");
    if (cell) cell.textContent = expiresText(model);
  }
}

// An endpoint this server lacks (404 on the route itself, or 405): hide its button for good.
function missingEndpoint(err) {
  return err instanceof ApiError && (err.status === 405 || (err.status === 404 && !err.detail));
}

function failed(model, err) {
  state.errors.set(model.id, err.message);
  reportError(null, err);
}

async function warm(model) {
  state.errors.delete(model.id);
  showError("");
  state.busy.set(model.id, "warming…");
  refresh();
  try {
    const job = await sendJson("POST", modelPath(model.id, "load"), {});
    state.busy.set(model.id, `warming · ${job.id}`);
    refresh();
    let last = job;
    if (!TERMINAL.has(job.status)) {
      await readEvents(`/v1/jobs/${job.id}/events`, (type, snapshot) => {
        if (!snapshot || snapshot.id !== job.id) return false; // a preview or other event
        last = snapshot;
        const label = snapshot.progress_label ? ` · ${snapshot.progress_label}` : "";
        state.busy.set(model.id, `warming ${Math.round((snapshot.progress || 0) * 100)}%${label}`);
        refresh();
        return type === "end" || TERMINAL.has(snapshot.status);
      });
    }
    if (last.status !== "succeeded") last = await getJson(`/v1/jobs/${job.id}`);
    if (last.status === "failed") throw new Error(`warming ${model.id} failed: ${last.error}`);
    if (last.status === "canceled") throw new Error(`warming ${model.id} was canceled`);
  } catch (err) {
    if (missingEndpoint(err)) state.canLoad = false;
    failed(model, err);
  } finally {
    state.busy.delete(model.id);
    refresh();
  }
}

async function unload(model) {
  state.errors.delete(model.id);
  showError("");
  state.busy.set(model.id, "unloading…");
  refresh();
  try {
    await sendJson("DELETE", modelPath(model.id, "resident"));
  } catch (err) {
    if (missingEndpoint(err)) state.canUnload = false;
    // 409: a job is using it right now; the server's detail says so.
    failed(model, err);
  } finally {
    state.busy.delete(model.id);
    refresh();
  }
}

async function load() {
  await findEndpoints();
  await refresh();
}

startPage(load);
setInterval(refresh, 5000);
setInterval(tickExpiry, 1000);
