// Generate: a prompt's images, subject x style grids (one child job per cell, each followed live), the gallery
// of generated images, and an image's page with its provenance, "reproduce" and "copy as curl".

import { API_BASE, api, followJob, query, submitJob } from "../api.js";
import {
  add, clear, copyText, definitionList, errorBox, field, formValues, h, imageElement, into, jobStatusLine,
  jsonBlock, pageTitle, progressBar, select, short, statusBadge, when,
} from "../ui.js";

export const SCHEDULERS = ["DDIM", "DDPM", "Euler", "Euler a", "Heun", "DPM++ 2M", "DPM++ 2M Karras", "DPM2", "DPM2 a",
  "UniPC", "PNDM", "LMS", "LMS Karras", "DEIS"];

function settingsFields(models, defaults = {}) {
  const number = (name, attrs) => h("input", { type: "number", name, inputmode: "numeric", ...attrs });
  return h("fieldset", { class: "settings" }, h("legend", {}, "Settings"),
    field("Model", select("model", [["", "newest"], ...models.map((m) => [m.name, `${m.name} (v${m.latest})`])], "")),
    h("div", { class: "row" },
      field("Seed", number("seed", { min: 0, max: 4294967295, placeholder: "random", value: defaults.seed })),
      field("Steps", number("steps", { min: 1, max: 150, value: defaults.steps ?? 30 })),
      field("Guidance", number("guidance_scale", { min: 0, max: 30, step: 0.5, value: 7.5 }))),
    h("div", { class: "row" },
      field("Width", number("width", { min: 64, max: 2048, step: 8, placeholder: "model's" })),
      field("Height", number("height", { min: 64, max: 2048, step: 8, placeholder: "model's" })),
      field("Scheduler", select("scheduler", [["", "pipeline's"], ...SCHEDULERS], ""))));
}

export async function render(view, { signal }) {
  const models = (await api("/v1/models", { signal }).catch(() => [])).filter((m) => m.kind === "text-to-image");
  const live = h("section", { class: "live", "aria-label": "Live progress" });
  const promptForm = h("form", { class: "card", "aria-label": "Generate from a prompt" },
    h("h2", {}, "Prompt"),
    field("Prompt", h("textarea", { name: "prompt", rows: 3, required: true, maxlength: 2000 })),
    field("Negative prompt", h("textarea", { name: "negative_prompt", rows: 2, maxlength: 2000 })),
    field("Images", h("input", { type: "number", name: "num_images", value: 1, min: 1, max: 8 })),
    settingsFields(models),
    h("button", { type: "submit", class: "primary" }, "Generate"));
  const gridForm = h("form", { class: "card", "aria-label": "Generate a grid" },
    h("h2", {}, "Subjects × styles grid"),
    h("div", { class: "row" },
      field("Subjects", h("textarea", { name: "subjects", rows: 4, required: true, placeholder: "a fox\na lighthouse" }), "One per line"),
      field("Styles", h("textarea", { name: "styles", rows: 4, required: true, placeholder: "watercolor\npixel art" }), "One per line")),
    field("Template", h("input", { type: "text", name: "template", value: "{subject}, in the style of {style}" })),
    field("Images per cell", h("input", { type: "number", name: "images_per_prompt", value: 1, min: 1, max: 4 })),
    settingsFields(models),
    h("button", { type: "submit", class: "primary" }, "Generate grid"));
  add(view, pageTitle("Generate"),
    models.length ? null : h("p", { class: "notice warn" }, "You have no text-to-image model yet: import a diffusers pipeline with ",
      h("code", {}, "POST /v1/models/import"), " (kind text-to-image)."),
    h("p", {}, h("a", { href: "#/gallery" }, "Gallery of generated images →")),
    h("div", { class: "two-columns" }, promptForm, gridForm), live);

  promptForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const line = jobStatusLine("Generation");
    const images = h("div", { class: "gallery" });
    await into(live, async () => {
      clear(live, h("h2", {}, "Generation"), line, images);
      const job = await submitJob("/v1/generate", formValues(promptForm), { onUpdate: (j) => line.update(j), signal, wait: 0 });
      if (job.status !== "succeeded") return add(live, errorBox(job.error || new Error(`The job ended ${job.status}.`)));
      clear(images, (job.output.images || []).map((image) => imageCard({ id: image.image_id, generation: { seed: image.seed, prompt: job.params.prompt } })));
      return job;
    }, "Submitting…");
  });

  gridForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const values = formValues(gridForm);
    const lines = (text) => (text || "").split("\n").map((s) => s.trim()).filter(Boolean);
    values.subjects = lines(values.subjects);
    values.styles = lines(values.styles);
    await into(live, () => followGrid(live, values, signal), "Submitting…");
  });
}

// The grid's parent job over SSE, and each cell's child job (streamed while stream slots last, else polled).
async function followGrid(live, params, signal) {
  const line = jobStatusLine("Grid");
  const cells = new Map(); // "subject\u0000style" -> td
  const gridTable = h("table", { class: "grid-cells" },
    h("caption", {}, "Cells: one job each"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "subject \\ style"), params.styles.map((s) => h("th", { scope: "col" }, s)))),
    h("tbody", {}, params.subjects.map((subject) => h("tr", {}, h("th", { scope: "row" }, subject),
      params.styles.map((style) => {
        const cell = h("td", { class: "cell", dataset: { subject, style, status: "waiting" } }, h("span", { class: "muted" }, "waiting"));
        cells.set(`${subject}\u0000${style}`, cell);
        return cell;
      })))));
  const after = h("div", { class: "grid-after" });
  clear(live, h("h2", {}, "Grid"), line, h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": "Grid cells" }, gridTable), after);
  const watched = new Set();
  const children = [];
  const showCell = (child) => {
    const cell = cells.get(`${child.params.subject}\u0000${child.params.style}`);
    if (!cell) return;
    cell.dataset.status = child.status;
    clear(cell, h("a", { href: `#/job/${child.id}`, class: "cell-job" }, statusBadge(child.status)),
      progressBar(child.progress, child.status, `${child.params.subject}, ${child.params.style}`),
      child.status === "succeeded" ? h("div", { class: "cell-images" }, (child.output?.images || []).map((image) =>
        h("a", { href: `#/image/${image.image_id}` }, imageElement(image.image_id, `${child.params.prompt} (seed ${image.seed})`, { class: "thumb" }))))
        : child.error ? h("small", { class: "error-text" }, child.error.message) : null);
  };
  const onParent = (job) => {
    line.update(job);
    for (const childId of job.children || []) {
      if (watched.has(childId)) continue;
      watched.add(childId);
      children.push(followJob(childId, { onUpdate: showCell, signal, pollEvery: 700 }).catch((error) => {
        if (error.name !== "AbortError") add(after, errorBox(error));
      }));
    }
  };
  const grid = await submitJob("/v1/generate/grid", params, { onUpdate: onParent, signal, wait: 0 });
  onParent(grid);
  await Promise.all(children);
  // Children seen only at the end (the grid ended within the first wait): show them from the grid's output.
  for (const cell of grid.output?.cells || []) {
    const td = cells.get(`${cell.subject}\u0000${cell.style}`);
    if (td && td.dataset.status === "waiting") {
      showCell({ id: cell.job_id, status: cell.status, progress: {}, params: { subject: cell.subject, style: cell.style, prompt: cell.prompt },
        output: { images: cell.images }, error: cell.error });
    }
  }
  if (grid.status !== "succeeded") {
    add(after, errorBox(grid.error || new Error(`The grid ended ${grid.status}.`)));
    return grid;
  }
  const output = grid.output;
  clear(after,
    h("p", { class: "notice ok" }, `${output.cells_succeeded} of ${output.cells.length} cells rendered`,
      output.cells_failed ? `, ${output.cells_failed} failed` : "", ". ",
      h("a", { href: `#/gallery${query({ grid: grid.id })}`, class: "grid-gallery-link" }, "The grid's images in the gallery"), " · ",
      h("a", { href: `#/gallery${query({ grid: grid.id, kind: "card" })}`, class: "grid-cards-link" }, "its contact sheets")),
    h("div", { class: "gallery sheets" }, (output.sheets || []).map((sheet) =>
      h("figure", { class: "sheet" }, h("a", { href: `#/image/${sheet.image_id}` },
        imageElement(sheet.image_id, sheet.kind === "index" ? "Index sheet of the grid" : `Contact sheet: ${sheet.style}`)),
      h("figcaption", {}, sheet.kind === "index" ? "index sheet" : sheet.style)))));
  return grid;
}

// --- gallery ---------------------------------------------------------------------------------------------------

const FILTERS = [["q", "Prompt words"], ["subject", "Subject"], ["style", "Style"], ["model", "Model"], ["grid", "Grid job"]];

export async function renderGallery(view, { query: params, signal, navigate }) {
  const kind = params.get("kind") || "generated";
  const form = h("form", { class: "card filters", role: "search", "aria-label": "Filter images" },
    h("div", { class: "row wrap" },
      FILTERS.map(([name, label]) => field(label, h("input", { type: "search", name, value: params.get(name) || "" }))),
      field("Kind", select("kind", [["generated", "generated"], ["card", "contact sheets"], ["uploaded", "uploaded"], ["all", "all"]], kind))),
    h("button", { type: "submit" }, "Filter"));
  const list = h("ul", { class: "gallery", "aria-label": "Images" });
  const more = h("div", { class: "more" });
  const count = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  add(view, pageTitle("Gallery"), form, count, list, more);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const values = formValues(form);
    navigate(`#/gallery${query(values)}`);
  });
  const filters = {};
  for (const [name] of FILTERS) if (params.get(name)) filters[name] = params.get(name);
  if (kind !== "all") filters.kind = kind;
  let shown = 0;
  const load = async (cursor) => {
    const page = await api(`/v1/images${query({ ...filters, limit: 24, cursor })}`, { signal });
    list.append(...page.data.map((image) => h("li", {}, imageCard(image))));
    shown += page.data.length;
    count.textContent = `${shown} ${shown === 1 ? "image" : "images"}${page.next_cursor ? " so far" : ""}`;
    clear(more, page.next_cursor ? h("button", { type: "button", onclick: () => into(more, () => load(page.next_cursor)) }, "More") : null);
  };
  await into(more, () => load());
}

function imageCard(image) {
  const g = image.generation || {};
  const title = g.card ? (g.card === "index" ? "index sheet" : `contact sheet: ${g.style}`) : g.prompt || image.id;
  return h("figure", { class: "image-card", dataset: { imageId: image.id } },
    h("a", { href: `#/image/${image.id}` }, imageElement(image.id, title, { loading: "lazy" })),
    h("figcaption", {}, h("span", { class: "prompt" }, title),
      h("small", { class: "muted" }, [g.seed !== undefined && g.seed !== null ? `seed ${g.seed}` : null,
        g.model && g.model.name ? `${g.model.name}:${g.model.version}` : typeof g.model === "string" ? g.model : null,
        g.steps ? `${g.steps} steps` : null].filter(Boolean).join(" · "))));
}

// --- one image ----------------------------------------------------------------------------------------------

export async function renderImage(view, { args, signal }) {
  const imageId = args[0];
  const body = h("div", { class: "image-page" });
  add(view, pageTitle("Image ", h("code", {}, imageId)), h("p", {}, h("a", { href: "#/gallery" }, "← Gallery")), body);
  const image = await api(`/v1/images/${imageId}`, { signal });
  const g = image.generation;
  const actions = h("div", { class: "actions" });
  const reproduced = h("div", { class: "reproduce-result", role: "status", "aria-live": "polite" });
  const curl = h("pre", { class: "curl", tabindex: "0", "aria-label": "curl command" });
  clear(body,
    h("div", { class: "two-columns" },
      h("figure", { class: "big-image" }, imageElement(image.id, g?.prompt || `Image ${image.id}`),
        h("figcaption", {}, `${image.width} × ${image.height} ${image.format}, ${Math.round(image.bytes / 1024)} KB`)),
      h("div", {},
        definitionList([["Kind", image.kind], ["Created", when(image.created_at)], ["sha256", h("code", { title: image.sha256 }, short(image.sha256, 16))],
          ["Made by", image.source_job_id ? h("a", { href: `#/job/${image.source_job_id}` }, image.source_job_id) : null]]),
        g ? generationFacts(g) : null, actions, reproduced)),
    g ? h("details", {}, h("summary", {}, "The whole generation record"), jsonBlock(g, "Generation record")) : null);

  if (g && image.kind === "generated" && g.prompt !== undefined) {
    const reproduce = h("button", { type: "button", class: "primary" }, "Reproduce");
    reproduce.addEventListener("click", async () => {
      reproduce.disabled = true;
      const line = jobStatusLine("Reproduce");
      await into(reproduced, async () => {
        clear(reproduced, line);
        const job = await submitJob(`/v1/images/${image.id}/reproduce`, undefined, { onUpdate: (j) => line.update(j), signal });
        if (job.status !== "succeeded") return add(reproduced, errorBox(job.error || new Error(`The job ended ${job.status}.`)));
        const out = job.output;
        add(reproduced, h("p", { class: `notice ${out.identical ? "ok" : "warn"}`, dataset: { identical: String(out.identical) } },
          out.identical ? "Identical: the re-render has the same bytes (the same image id)." : "Different bytes: ",
          out.identical ? null : h("a", { href: `#/image/${out.image_id}` }, out.image_id)));
        return job;
      }, "Submitting…");
      reproduce.disabled = false;
    });
    const command = curlCommand(g);
    const copy = h("button", { type: "button" }, "Copy as curl");
    copy.addEventListener("click", () => {
      curl.hidden = false;
      copyText(command, copy);
    });
    curl.textContent = command;
    curl.hidden = true;
    add(actions, reproduce, " ", copy);
    add(body, curl);
  }
}

function generationFacts(g) {
  if (g.card) {
    return definitionList([["Contact sheet", g.card === "index" ? "index" : `style ${g.style}`],
      ["Subjects", (g.subjects || []).join(", ")], ["Styles", (g.styles || []).join(", ")], ["Seed", g.seed],
      ["Grid", g.grid_id ? h("a", { href: `#/job/${g.grid_id}` }, g.grid_id) : null]]);
  }
  const model = g.model || {};
  return h("section", { class: "provenance", "aria-label": "Generation" }, h("h2", {}, "Generation"), definitionList([
    ["Prompt", g.prompt], ["Negative prompt", g.negative_prompt], ["Seed", g.seed], ["Steps", g.steps],
    ["Guidance", g.guidance_scale], ["Size", g.width ? `${g.width} × ${g.height}` : null], ["Scheduler", g.scheduler],
    ["Model", model.name ? `${model.name} v${model.version}` : null],
    ["Model sha256", model.sha256 ? h("code", { title: model.sha256 }, short(model.sha256, 16)) : null],
    ["Pipeline", g.pipeline], ["Device", [g.device, g.dtype, g.cpu_threads ? `${g.cpu_threads} threads` : null].filter(Boolean).join(" · ")],
    ["Noise", g.noise], ["Subject", g.subject], ["Style", g.style],
    ["Job", g.job_id ? h("a", { href: `#/job/${g.job_id}` }, g.job_id) : null],
    ["Grid", g.grid_id ? h("a", { href: `#/job/${g.grid_id}` }, g.grid_id) : null],
  ]));
}

// The same render as a client would ask for it: POST /v1/generate with the record's parameters and model version.
export function curlCommand(g) {
  const body = {};
  for (const name of ["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "scheduler"]) {
    if (g[name] !== undefined && g[name] !== null) body[name] = g[name];
  }
  if (g.model && g.model.name) body.model = `${g.model.name}:${g.model.version}`;
  const json = JSON.stringify(body).replace(/'/g, "'\\''");
  return [
    `curl -s -H "Authorization: Bearer $PERCEPT_KEY" -H "Content-Type: application/json" -H "Prefer: wait=60" \\`,
    `     -d '${json}' \\`,
    `     ${API_BASE}/v1/generate`,
  ].join("\n");
}
