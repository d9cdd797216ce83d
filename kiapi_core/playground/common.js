// What the Models, Jobs and Files pages share: the API key field, calls with the bearer token,
// Server-Sent Events read from fetch(), blob: URLs for images, and small DOM and format helpers.
//
// The key lives in localStorage under the playground's own name, so typing it on one page
// unlocks them all. EventSource and <img src> cannot send an Authorization header, hence
// fetch() streaming for events and fetch() + blob: URLs for images.

export const $ = (id) => document.getElementById(id);
export const KEY_STORAGE = "kiapi.playground.key";
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

export class ApiError extends Error {
  constructor(status, message, detail = null) {
    super(message);
    this.status = status;
    this.detail = detail;
  }
}

// -- HTTP --------------------------------------------------------------------------------
export function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const key = $("api-key")?.value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

export function describe(detail) {
  if (Array.isArray(detail)) {
    return detail
      .map((e) => (e && e.msg ? `${(e.loc || []).slice(1).join(".") || "body"}: ${e.msg}` : JSON.stringify(e)))
      .join("\n");
  }
  if (detail && typeof detail === "object") return detail.msg || JSON.stringify(detail);
  return String(detail);
}

// Absolute from the origin: a page opened as user:key@host/... has credentials in its URL, and
// fetch() refuses URLs that carry credentials, relative ones resolved against it too.
export const absolute = (path) => new URL(path, location.origin);

export async function api(path, options = {}) {
  const response = await fetch(absolute(path), { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let detail = null;
    try {
      const body = await response.json();
      detail = body.detail ?? body.error?.message ?? body;
      message = describe(detail);
    } catch { /* not JSON: keep the status line */ }
    if (response.status === 401) message = "The server needs its API key: enter it above. " + message;
    throw new ApiError(response.status, message, detail);
  }
  return response;
}

export const getJson = async (path) => (await api(path)).json();

export async function sendJson(method, path, body) {
  const options = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  return (await api(path, options)).json();
}

// One SSE stream read from a fetch() body (so the Authorization header goes along). Calls
// onEvent(type, data, id) per event; resolves when the server ends the stream or onEvent
// returns true (enough). `lastEventId` resumes a stream that was cut; `onOpen` runs once the
// server has accepted the stream.
export async function readEvents(path, onEvent, { signal, lastEventId, onOpen } = {}) {
  const headers = { Accept: "text/event-stream" };
  if (lastEventId) headers["Last-Event-ID"] = lastEventId;
  const response = await api(path, { headers, signal });
  if (onOpen) onOpen(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r/g, "");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let type = "message";
        let id = null;
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) type = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          else if (line.startsWith("id:")) id = line.slice(3).trim();
        }
        if (!data.length) continue; // a retry hint or a keep-alive comment
        let parsed;
        try {
          parsed = JSON.parse(data.join("\n"));
        } catch {
          continue;
        }
        if (onEvent(type, parsed, id)) return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// A URL for bytes fetched with the key, cached by `cacheKey` (file ids never change content).
const blobs = new Map();
export async function blobUrl(path, cacheKey = path) {
  if (!blobs.has(cacheKey)) {
    const blob = await (await api(path)).blob();
    blobs.set(cacheKey, URL.createObjectURL(blob));
  }
  return blobs.get(cacheKey);
}

// The file's bytes saved under its name: an <a download> on a blob: URL, since a plain link
// could not carry the key.
export async function download(fileId, filename) {
  const url = await blobUrl(`/v1/files/${fileId}/download`, fileId);
  const link = el("a", { href: url, download: filename || fileId, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
}

// -- DOM ---------------------------------------------------------------------------------
// el("button", {type: "button", className: "small", onclick}, "Cancel"); data-* via dataset.
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name in node && name !== "list") node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

// The error of an action on one row: shown in the row and at the top (role=alert reads it out).
export function reportError(where, err) {
  const message = err instanceof Error ? err.message : String(err);
  if (where) {
    where.textContent = message;
    where.hidden = false;
  }
  showError(message);
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // No clipboard API (a plain-http origin other than localhost): the old way.
    const area = el("textarea", { value: text, readOnly: true, className: "offscreen" });
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

// -- formats -----------------------------------------------------------------------------
export function formatBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let value = n;
  while (value >= 1024 && i < units.length - 1) {
    value /= 1024;
    i++;
  }
  return `${i ? value.toFixed(value < 10 ? 1 : 0) : value} ${units[i]}`;
}

export const formatTime = (unix) => (unix ? new Date(unix * 1000).toLocaleString() : "");

export function formatSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

// -- the header every page shares --------------------------------------------------------
// Wires the key field (remembered in this browser) and the server line; `onKey` reloads the
// page's data once a key is typed.
export function startPage(onKey) {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, key.value.trim());
    onKey();
  });
  for (const link of document.querySelectorAll("nav.pages a")) {
    if (link.getAttribute("href") === location.pathname) link.setAttribute("aria-current", "page");
  }
  loadServer();
  onKey();
}

export async function loadServer() {
  const line = $("server");
  try {
    const health = await (await fetch(absolute("/health"))).json();
    const readiness = health.readiness ? ` · ${health.readiness}` : "";
    line.textContent = `kiapi ${health.version}${readiness} · ${health.queue.running} running, ${health.queue.waiting} waiting`;
    return health;
  } catch {
    line.textContent = "server unreachable";
    return null;
  }
}
