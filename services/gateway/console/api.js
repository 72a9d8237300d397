// The public REST API, as any client calls it: every request carries `Authorization: Bearer <key>`.
// The key lives in sessionStorage only (gone when the tab closes), never in a cookie or in localStorage.

const KEY_NAME = "percept.api-key";
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

// The origin the console was served from is the API's.
export const API_BASE = location.origin;

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `The API answered ${status}.`);
    this.status = status;
    this.code = error.code || "http_" + status;
    this.details = error.details || {};
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

// One call: JSON in (a plain object) or a FormData, JSON out; a non-2xx answer throws an ApiError.
export async function api(path, { method = "GET", body, headers = {}, signal, raw = false } = {}) {
  const init = { method, signal, headers: { Authorization: `Bearer ${apiKey()}`, ...headers } };
  if (body instanceof FormData) {
    init.body = body;
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(API_BASE + path, init);
  if (raw && response.ok) return response;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return data;
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(name, value);
  }
  const text = search.toString();
  return text ? "?" + text : "";
}

// --- jobs ------------------------------------------------------------------------------------------------------

// Submit a job-creating POST, held up to `wait` seconds for its end (RFC 7240 `Prefer: wait`); then follow it
// live. Long jobs whose steps the page shows as they happen (generations, grids) are submitted with wait 0.
export async function submitJob(path, body, { onUpdate = () => {}, signal, wait = 30 } = {}) {
  const headers = wait > 0 ? { Prefer: `wait=${wait}` } : {};
  const job = await api(path, { method: "POST", body, headers, signal });
  onUpdate(job);
  if (TERMINAL.has(job.status)) return job;
  return followJob(job.id, { onUpdate, signal });
}

// Server-sent events need the Authorization header, which EventSource cannot send: read the stream with fetch.
// A browser keeps at most six HTTP/1.1 connections per host, so at most STREAMS jobs are streamed at once;
// any other job is polled. Resolves with the terminal job.
const STREAMS = 3;
let streaming = 0;

export async function followJob(jobId, { onUpdate = () => {}, signal, pollEvery = 1000 } = {}) {
  let last = null;
  const update = (job) => {
    last = job;
    onUpdate(job);
  };
  while (!signal || !signal.aborted) {
    if (streaming < STREAMS) {
      streaming += 1;
      try {
        await streamJob(jobId, update, signal);
      } catch (error) {
        if (error.name === "AbortError" || (error instanceof ApiError && error.status < 500)) throw error;
      } finally {
        streaming -= 1;
      }
      if (last && TERMINAL.has(last.status)) return last;
    }
    // No stream slot (or the stream broke off): one look now, then again in a moment.
    const job = await api(`/v1/jobs/${jobId}`, { signal });
    update(job);
    if (TERMINAL.has(job.status)) return job;
    await sleep(pollEvery, signal);
  }
  throw new DOMException("aborted", "AbortError");
}

async function streamJob(jobId, update, signal) {
  const response = await api(`/v1/jobs/${jobId}/events`, {
    raw: true, signal, headers: { Accept: "text/event-stream" },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEvent(block);
      if (event.event === "job" && event.data) update(JSON.parse(event.data));
    }
  }
}

export function parseEvent(block) {
  const event = { event: "message", data: "" };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment: the server's keep-alive ping
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") data.push(value);
    else if (field === "event" || field === "id") event[field] = value;
  }
  event.data = data.join("\n");
  return event;
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(new DOMException("aborted", "AbortError"));
    }, { once: true });
  });
}

// --- images ----------------------------------------------------------------------------------------------------

export async function uploadImage(file, signal) {
  const form = new FormData();
  form.append("file", file, file.name || "image");
  return api("/v1/images", { method: "POST", body: form, signal });
}

// Image bytes need the key too, so <img src> cannot fetch them: fetch them, and show an object URL.
// Image ids name immutable bytes, so one URL per id serves the whole session.
const imageUrls = new Map();

export function imageUrl(imageId) {
  if (!imageUrls.has(imageId)) {
    const url = api(`/v1/images/${imageId}/content`, { raw: true })
      .then((response) => response.blob())
      .then((blob) => URL.createObjectURL(blob));
    url.catch(() => imageUrls.delete(imageId));
    imageUrls.set(imageId, url);
  }
  return imageUrls.get(imageId);
}

export function forgetImages() {
  for (const url of imageUrls.values()) url.then((u) => URL.revokeObjectURL(u), () => {});
  imageUrls.clear();
}
