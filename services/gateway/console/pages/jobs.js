// Jobs: the list with filters, live while jobs run; a job's page (params, output, error, provenance, timings,
// cancel), followed live over server-sent events.

import { TERMINAL, api, followJob, query } from "../api.js";
import {
  add, clear, definitionList, duration, errorBox, field, formValues, h, imageElement, into, jsonBlock,
  milliseconds, pageTitle, progressBar, progressText, provenance, select, statusBadge, table, when,
} from "../ui.js";

const KINDS = ["", "classify", "caption", "faces_detect", "faces_verify", "faces_identify", "faces_enroll", "memes",
  "generate", "generate_grid", "reproduce_image", "train_classifier", "train_captioner", "analyze_dataset",
  "build_ensemble", "import_captioner", "import_pipeline"];
const STATUSES = ["", "queued", "running", "succeeded", "failed", "canceled"];

export async function render(view, { query: params, signal, navigate }) {
  const form = h("form", { class: "card filters", role: "search", "aria-label": "Filter jobs" },
    h("div", { class: "row wrap" },
      field("Kind", select("kind", KINDS.map((k) => [k, k || "any"]), params.get("kind") || "")),
      field("Status", select("status", STATUSES.map((s) => [s, s || "any"]), params.get("status") || "")),
      field("Model", h("input", { type: "search", name: "model", value: params.get("model") || "" })),
      field("Search", h("input", { type: "search", name: "q", value: params.get("q") || "", placeholder: "labels, captions, prompts" }))),
    h("button", { type: "submit" }, "Filter"));
  const body = h("tbody", {});
  const more = h("div", { class: "more" });
  add(view, pageTitle("Jobs"), form,
    h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Jobs" },
      h("table", { class: "jobs" }, h("caption", {}, "Newest first; running jobs update live"),
        h("thead", {}, h("tr", {}, ["job", "kind", "status", "progress", "created", "took"].map((t) => h("th", { scope: "col" }, t)))),
        body)),
    more);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    navigate(`#/jobs${query(formValues(form))}`);
  });
  const filters = Object.fromEntries(["kind", "status", "model", "q"].map((name) => [name, params.get(name) || undefined]));
  let followed = 0; // live rows: the first few running jobs (three streamed, the rest polled)
  const row = (job) => {
    const tr = h("tr", { dataset: { job: job.id, status: job.status } });
    tr.update = (j) => {
      tr.dataset.status = j.status;
      clear(tr, h("td", {}, h("a", { href: `#/job/${j.id}` }, j.id)), h("td", {}, j.kind), h("td", {}, statusBadge(j.status)),
        h("td", { dataset: { label: "progress" } }, progressText(j.progress, j.status)),
        h("td", { dataset: { label: "created" } }, when(j.created_at)),
        h("td", { class: "num", dataset: { label: "took" } }, duration(j.started_at || j.created_at, j.finished_at)));
    };
    tr.update(job);
    if (!TERMINAL.has(job.status) && followed < 10) {
      followed += 1;
      followJob(job.id, { onUpdate: tr.update, signal, pollEvery: 2000 }).catch(() => {});
    }
    return tr;
  };
  const load = async (cursor) => {
    const page = await api(`/v1/jobs${query({ ...filters, limit: 50, cursor })}`, { signal });
    add(body, ...page.data.map(row));
    if (!cursor && !page.data.length) add(body, h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No job matches.")));
    clear(more, page.next_cursor ? h("button", { type: "button", onclick: () => into(more, () => load(page.next_cursor)) }, "More") : null);
  };
  await into(more, () => load());
}

export async function renderJob(view, { args, signal }) {
  const jobId = args[0];
  const header = h("div", { class: "job-header", role: "status", "aria-live": "polite" });
  const timeline = h("ol", { class: "timeline", "aria-label": "What the page saw" });
  const body = h("div", { class: "job-body" });
  const actions = h("div", { class: "actions" });
  add(view, pageTitle("Job ", h("code", {}, jobId)), header, actions, body,
    h("details", { class: "seen" }, h("summary", {}, "Live updates seen"), timeline));
  const seen = [];
  let lastKey = "";
  const show = (job) => {
    const key = `${job.status} ${progressText(job.progress, job.status)}`;
    if (key !== lastKey) {
      lastKey = key;
      seen.push(job.status);
      add(timeline, h("li", { dataset: { status: job.status } }, `${new Date().toLocaleTimeString()} ${key}`));
      view.dataset.seen = seen.join(" ");
    }
    clear(header, h("span", { class: "job-kind" }, job.kind), " ", statusBadge(job.status), " ",
      progressBar(job.progress, job.status, "Job progress"));
    // The details change with the status (output, error, provenance); progress alone only moves the header.
    const bodyKey = `${job.status} ${(job.children || []).length}`;
    if (body.dataset.key !== bodyKey) {
      body.dataset.key = bodyKey;
      clear(actions, TERMINAL.has(job.status) ? null : cancelButton(job, show, signal));
      clear(body, ...jobDetails(job));
    }
    header.dataset.status = job.status;
  };
  const job = await api(`/v1/jobs/${jobId}`, { signal });
  show(job);
  if (!TERMINAL.has(job.status)) show(await followJob(jobId, { onUpdate: show, signal }));
}

function cancelButton(job, show, signal) {
  const button = h("button", { type: "button", class: "danger" }, "Cancel");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      show(await api(`/v1/jobs/${job.id}/cancel`, { method: "POST", signal }));
    } catch (error) {
      button.after(errorBox(error));
      button.disabled = false;
    }
  });
  return button;
}

function jobDetails(job) {
  const timings = job.provenance?.timings_ms || {};
  return [
    h("section", { "aria-label": "Timings" }, h("h2", {}, "Timings"), definitionList([
      ["Created", when(job.created_at)], ["Started", when(job.started_at)], ["Finished", when(job.finished_at)],
      ["Waited", duration(job.created_at, job.started_at)], ["Ran", duration(job.started_at, job.finished_at)],
      ["Attempts", job.attempts],
      ["On the worker", Object.keys(timings).length
        ? Object.entries(timings).map(([name, ms]) => `${name} ${milliseconds(ms)}`).join(" · ") : null],
    ])),
    job.parent_id || (job.children || []).length ? h("section", { "aria-label": "Related jobs" }, h("h2", {}, "Related jobs"), definitionList([
      ["Parent", job.parent_id ? h("a", { href: `#/job/${job.parent_id}` }, job.parent_id) : null],
      ["Children", (job.children || []).length ? h("ul", { class: "plain" }, job.children.map((id) => h("li", {}, h("a", { href: `#/job/${id}` }, id)))) : null],
    ])) : null,
    h("section", { "aria-label": "Parameters" }, h("h2", {}, "Parameters"), jsonBlock(job.params, "Parameters")),
    job.error ? h("section", { "aria-label": "Error" }, h("h2", {}, "Error"), errorBox(job.error), jsonBlock(job.error, "Error")) : null,
    job.output ? h("section", { "aria-label": "Output" }, h("h2", {}, "Output"), outputImages(job.output), jsonBlock(job.output, "Output")) : null,
    provenance(job.provenance, "h2"),
  ];
}

// Images an output names (generations, memes, grids' sheets), shown above its JSON.
function outputImages(output) {
  const ids = new Set();
  if (output.image_id) ids.add(output.image_id);
  for (const image of output.images || []) if (image.image_id) ids.add(image.image_id);
  for (const id of output.cards || []) ids.add(id);
  if (!ids.size) return null;
  return h("div", { class: "gallery compact" }, [...ids].slice(0, 24).map((id) =>
    h("a", { href: `#/image/${id}` }, imageElement(id, `Image ${id}`, { class: "thumb", loading: "lazy" }))));
}
