// The Files page: GET /v1/files page by page (next_cursor), with size, type, creation time and
// the job that made each file; download (fetched with the key, saved from a blob: URL) and
// delete (asked once more in the row itself, then DELETE /v1/files/{id}).

import {
  $, blobUrl, download, el, formatBytes, formatTime, getJson, reportError, sendJson, showError,
  startPage,
} from "/playground/common.js";

const PAGE_SIZE = 25;
const MAX_THUMB_BYTES = 4 * 1024 * 1024;

const state = { cursor: null, count: 0 };

function thumb(info) {
  const box = el("div", { className: "thumb" }, info.content_type.split("/")[0]);
  if (info.content_type.startsWith("image/") && info.bytes <= MAX_THUMB_BYTES) {
    blobUrl(`/v1/files/${info.id}/download`, info.id)
      .then((url) => box.replaceChildren(el("img", { src: url, alt: info.filename })))
      .catch(() => {});
  }
  return box;
}

function deleteControls(info, cell) {
  const ask = el("button", {
    type: "button", className: "small danger delete", "aria-label": `Delete ${info.filename}`,
  }, "Delete");
  ask.addEventListener("click", () => {
    const yes = el("button", { type: "button", className: "small danger confirm-delete" }, "Delete it");
    const no = el("button", { type: "button", className: "small secondary keep" }, "Keep");
    const question = el("span", { className: "confirm", role: "group", "aria-label": "Confirm delete" },
      `Delete ${info.filename}?`, yes, no);
    no.addEventListener("click", () => {
      question.replaceWith(ask);
      ask.focus();
    });
    yes.addEventListener("click", () => remove(info, cell, question));
    ask.replaceWith(question);
    no.focus(); // the safe answer first
  });
  return ask;
}

async function remove(info, cell, question) {
  const rowError = cell.querySelector(".row-error");
  for (const b of question.querySelectorAll("button")) b.disabled = true;
  try {
    await sendJson("DELETE", `/v1/files/${info.id}`);
    const tr = cell.closest("tr");
    (tr.nextElementSibling?.querySelector("button") || $("refresh")).focus();
    tr.remove();
    state.count--;
    showCount();
  } catch (err) {
    for (const b of question.querySelectorAll("button")) b.disabled = false;
    reportError(rowError, err);
  }
}

function row(info) {
  const actions = el("td", { className: "actions", dataset: { label: "Actions" } });
  const get = el("button", { type: "button", className: "small download", "aria-label": `Download ${info.filename}` }, "Download");
  get.addEventListener("click", () => download(info.id, info.filename).catch((err) => reportError(actions.querySelector(".row-error"), err)));
  actions.append(get, deleteControls(info, actions), el("p", { className: "row-error", role: "alert", hidden: true }));
  return el("tr", { dataset: { file: info.id } },
    el("td", { dataset: { label: "Preview" } }, thumb(info)),
    el("td", { dataset: { label: "Name" } }, el("strong", { className: "name" }, info.filename), el("div", {}, el("code", { className: "muted" }, info.id))),
    el("td", { dataset: { label: "Type" } }, info.content_type),
    el("td", { dataset: { label: "Size" }, title: `${info.bytes} bytes` }, formatBytes(info.bytes)),
    el("td", { dataset: { label: "Created" } }, formatTime(info.created_at)),
    el("td", { dataset: { label: "Job" } }, info.job_id ? el("code", {}, info.job_id) : el("span", { className: "muted" }, "upload")),
    actions,
  );
}

function showCount() {
  $("count").textContent = `${state.count} file${state.count === 1 ? "" : "s"} shown${state.cursor ? ", more below" : ""}`;
  $("files-empty").hidden = state.count > 0;
  $("more").hidden = !state.cursor;
}

async function loadPage(cursor = null) {
  const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
  if (cursor) params.set("cursor", cursor);
  const page = await getJson(`/v1/files?${params}`);
  state.cursor = page.next_cursor;
  state.count += page.files.length;
  $("files").tBodies[0].append(...page.files.map(row));
  showCount();
}

async function reload() {
  $("files").tBodies[0].replaceChildren();
  state.cursor = null;
  state.count = 0;
  try {
    await loadPage();
    showError("");
  } catch (err) {
    showError(err.message);
  }
}

$("refresh").addEventListener("click", reload);
$("more").addEventListener("click", () => loadPage(state.cursor).catch((err) => showError(err.message)));
startPage(reload);
