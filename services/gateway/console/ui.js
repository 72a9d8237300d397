// Small DOM helpers and the pieces every page shares. Text always goes in as text nodes (never innerHTML),
// so nothing a job or a user wrote can run as markup on a page that holds an API key.

import { ApiError, TERMINAL, imageUrl } from "./api.js";

const SVG_NS = "http://www.w3.org/2000/svg";

// h("p", {class: "x", onclick: f}, "text", child, [more children]) -> an element.
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  return fill(element, attrs, children);
}

export function svg(tag, attrs = {}, ...children) {
  const element = document.createElementNS(SVG_NS, tag);
  return fill(element, attrs, children);
}

function fill(element, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else if (name === "value" && "value" in element) {
      element.value = value;
    } else {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else element.append(child instanceof Node ? child : String(child));
  }
}

// element.append(...) that skips null, undefined and false (DOM append would print them as text).
export function add(element, ...children) {
  append(element, children);
  return element;
}

export function clear(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

// --- formatting ------------------------------------------------------------------------------------------------

export function fixed(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

export function percent(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)} %` : "–";
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function duration(startIso, endIso) {
  if (!startIso || !endIso) return "–";
  return milliseconds(new Date(endIso) - new Date(startIso));
}

export function milliseconds(ms) {
  if (typeof ms !== "number") return "–";
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

export function short(hash, length = 12) {
  return hash ? String(hash).slice(0, length) : "–";
}

// --- shared pieces ---------------------------------------------------------------------------------------------

export function pageTitle(text, ...rest) {
  return h("h1", { tabindex: "-1", class: "page-title" }, text, ...rest);
}

export function errorBox(error) {
  const message = error instanceof ApiError ? error.message : String(error?.message || error);
  const code = error instanceof ApiError ? error.code : error?.code;
  return h("div", { class: "notice error", role: "alert" },
    h("strong", {}, "Error"), code ? h("code", {}, code) : null, " ", message);
}

// An area whose content is replaced by the outcome of an async step: busy text, then the result or an error.
export async function into(element, work, busyText = "Loading…") {
  clear(element, h("p", { class: "busy" }, busyText));
  element.setAttribute("aria-busy", "true");
  try {
    const result = await work();
    return result;
  } catch (error) {
    if (error.name === "AbortError") return undefined;
    clear(element, errorBox(error));
    return undefined;
  } finally {
    element.removeAttribute("aria-busy");
  }
}

export function statusBadge(status) {
  return h("span", { class: `status status-${status}`, dataset: { status } }, status);
}

export function progressText(progress = {}, status) {
  if (TERMINAL.has(status) && status !== "succeeded") return status;
  const parts = [];
  if (progress.step !== undefined && progress.steps) {
    parts.push(`step ${progress.step}/${progress.steps}`);
    if (progress.images > 1) parts.push(`image ${progress.image}/${progress.images}`);
  } else if (progress.phase === "features" || progress.stage === "features") {
    parts.push(`features ${progress.done}/${progress.total}`);
  } else if (progress.phase === "calibration") {
    parts.push(`calibration ${progress.done}/${progress.total}`);
  } else if (progress.phase === "training") {
    parts.push(`epoch ${progress.done}/${progress.total}`);
  } else if (progress.stage === "train" && progress.epochs) {
    parts.push(`epoch ${progress.epoch || Math.round((progress.epochs * progress.done) / progress.total)}` +
      `/${progress.epochs}`);
  } else if (progress.total) {
    parts.push(`${progress.done ?? 0}/${progress.total}`);
  }
  if (typeof progress.eta_seconds === "number" && status === "running") parts.push(`ETA ${progress.eta_seconds.toFixed(1)} s`);
  return parts.join(" · ");
}

export function progressBar(progress = {}, status, label = "Progress") {
  const total = progress.total || 1;
  const done = status === "succeeded" ? total : Math.min(progress.done || 0, total);
  return h("div", { class: "progress-line" },
    h("progress", { max: total, value: done, "aria-label": label }),
    h("span", { class: "progress-text" }, progressText(progress, status)));
}

// A job's live header: status, progress; the element is updated in place by `update(job)`.
export function jobStatusLine(label = "Job") {
  const element = h("div", { class: "job-line", role: "status", "aria-live": "polite" });
  element.update = (job) => {
    clear(element,
      h("span", { class: "job-line-label" }, label, " "),
      h("a", { href: `#/job/${job.id}` }, job.id), " ",
      statusBadge(job.status), " ",
      progressBar(job.progress, job.status, `${label} progress`));
  };
  return element;
}

export function definitionList(rows) {
  return h("dl", { class: "facts" },
    rows.filter((row) => row && row[1] !== undefined && row[1] !== null && row[1] !== "")
      .map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

export function jsonBlock(value, label) {
  return h("pre", { class: "json", tabindex: "0", "aria-label": label || "JSON" }, JSON.stringify(value, null, 2));
}

export function provenance(record, heading = "h3") {
  if (!record) return h("p", { class: "muted" }, "No provenance yet.");
  const model = record.model || {};
  const worker = record.worker || {};
  const timings = record.timings_ms || {};
  const libraries = Object.entries(record.libraries || {}).map(([name, version]) => `${name} ${version}`).join(", ");
  return h("section", { class: "provenance", "aria-label": "Provenance" },
    h(heading, {}, "Provenance"),
    definitionList([
      ["Model", model.name ? `${model.name} v${model.version}` : null],
      ["Weights sha256", model.sha256 ? h("code", { title: model.sha256 }, short(model.sha256, 16)) : null],
      ["Inputs", (record.inputs || []).length ? (record.inputs || []).map((input) =>
        h("span", { class: "input" }, h("code", {}, input.image_id), " ", h("code", { class: "muted" }, short(input.sha256)))) : null],
      ["Worker", [worker.host, worker.device].filter(Boolean).join(" · ") || null],
      ["Code version", record.code_version ? h("code", {}, short(record.code_version, 12)) : null],
      ["Seed", record.seed ?? null],
      ["Libraries", libraries || null],
      ["Timings", heading === "h3" && Object.keys(timings).length
        ? Object.entries(timings).map(([name, ms]) => `${name} ${milliseconds(ms)}`).join(" · ") : null],
    ]));
}

export function imageElement(imageId, alt, attrs = {}) {
  const img = h("img", { alt, decoding: "async", ...attrs, dataset: { imageId } });
  imageUrl(imageId).then((url) => { img.src = url; }, () => { img.alt = `${alt} (could not be loaded)`; });
  return img;
}

// A labelled form field: label text, the control, an optional hint.
export function field(labelText, control, hint) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  const hintElement = hint ? h("small", { class: "hint", id: `${id}-hint` }, hint) : null;
  if (hintElement) control.setAttribute("aria-describedby", hintElement.id);
  return h("div", { class: "field" }, h("label", { for: id }, labelText), control, hintElement);
}

export function checkbox(labelText, control) {
  control.type = "checkbox";
  control.checked = control.hasAttribute("checked");
  return h("label", { class: "check" }, control, " ", labelText);
}

export function select(name, options, selected) {
  return h("select", { name },
    options.map((option) => {
      const [value, text] = Array.isArray(option) ? option : [option, option];
      return h("option", { value, selected: value === selected ? true : null }, text);
    }));
}

// Form values as an object: empty fields left out, numbers as numbers, checkboxes as booleans.
export function formValues(form) {
  const values = {};
  for (const element of form.elements) {
    if (!element.name || element.disabled || element.type === "file") continue;
    if (element.type === "checkbox") values[element.name] = element.checked;
    else if (element.type === "radio") { if (element.checked) values[element.name] = element.value; }
    else if (element.value.trim() === "") continue;
    else if (element.type === "number") values[element.name] = Number(element.value);
    else values[element.name] = element.value.trim();
  }
  return values;
}

// A photo picker: choose a file or drop one; calls onFile(file) and shows a preview.
export function photoPicker({ label = "Photo", onFile, accept = "image/*", name = "photo" }) {
  const input = h("input", { type: "file", accept, name, class: "visually-hidden" });
  const preview = h("div", { class: "drop-preview" });
  const zone = h("label", { class: "drop-zone", for: "" },
    h("span", { class: "drop-title" }, label),
    h("span", { class: "muted" }, "Drop a file here, or choose one"),
    input, preview);
  input.id = `${name}-${Math.random().toString(36).slice(2, 7)}`;
  zone.setAttribute("for", input.id);
  let thumbUrl = null;
  const take = (file) => {
    if (!file) return;
    zone.classList.add("has-file");
    if (thumbUrl) URL.revokeObjectURL(thumbUrl);
    thumbUrl = file.type.startsWith("image/") ? URL.createObjectURL(file) : null;
    clear(preview, thumbUrl ? h("img", { src: thumbUrl, alt: "", class: "drop-thumb" }) : null,
      h("span", { class: "file-name" }, file.name, ` (${Math.round(file.size / 1024)} KB)`));
    onFile(file);
  };
  input.addEventListener("change", () => take(input.files[0]));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    take(event.dataTransfer.files[0]);
  });
  zone.input = input;
  return zone;
}

// headers: ["name", ...]; a header ending in "#" heads a numeric column (right-aligned; the "#" is dropped).
export function table(headers, rows, { caption, className = "" } = {}) {
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption || "Table" },
    h("table", { class: className },
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((text) => (text.endsWith("#")
        ? h("th", { scope: "col", class: "num" }, text.slice(0, -1)) : h("th", { scope: "col" }, text))))),
      h("tbody", {}, rows)));
}

export async function copyText(text, button) {
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    copied = false;
  }
  if (button) {
    const before = button.textContent;
    button.textContent = copied ? "Copied" : "Select the text to copy";
    setTimeout(() => { button.textContent = before; }, 1500);
  }
  return copied;
}
