// Train: upload a dataset zip, read its report, train a classifier or a captioner, watch the curves live,
// then the per-class metrics and the confusion matrix (or the BLEU table).

import { TERMINAL, api, followJob, query } from "../api.js";
import { heatMap, lineChart } from "../charts.js";
import {
  add, checkbox, clear, definitionList, errorBox, field, fixed, formValues, h, into, jobStatusLine, pageTitle,
  photoPicker, select, statusBadge, table, when,
} from "../ui.js";

export async function render(view, { args, signal, navigate }) {
  if (args[0] === "dataset" && args[1]) return renderDataset(view, args[1], signal, navigate);
  if (args[0] === "job" && args[1]) return renderTraining(view, args[1], signal);

  let zip = null;
  const picker = photoPicker({ label: "Dataset zip", name: "dataset", accept: ".zip,application/zip", onFile: (f) => { zip = f; } });
  const status = h("div", { class: "upload-status", role: "status", "aria-live": "polite" });
  const upload = h("form", { class: "card", "aria-label": "Upload a dataset" },
    h("h2", {}, "Upload a dataset"),
    h("p", { class: "muted" }, "One folder per class (cats/1.jpg, dogs/1.jpg), or captioned images: the Flickr8k layout, ",
      "COCO captions, captions.jsonl or captions.csv."),
    picker,
    field("Name", h("input", { type: "text", name: "name", maxlength: 200, placeholder: "the file's name" })),
    h("button", { type: "submit", class: "primary" }, "Upload and analyse"), status);
  const datasets = h("div", { class: "datasets" });
  const trainings = h("div", { class: "trainings" });
  add(view, pageTitle("Train"),
    h("div", { class: "two-columns" }, upload,
      h("section", { "aria-label": "Datasets" }, h("h2", {}, "Datasets"), datasets)),
    h("section", { "aria-label": "Training jobs" }, h("h2", {}, "Training jobs"), trainings));

  upload.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!zip) {
      clear(status, errorBox(new Error("Choose a zip first.")));
      return;
    }
    const form = new FormData();
    form.append("file", zip, zip.name);
    const name = upload.elements.name.value.trim();
    if (name) form.append("name", name);
    await into(status, async () => {
      const dataset = await api("/v1/datasets", { method: "POST", body: form, signal });
      navigate(`#/train/dataset/${dataset.id}`);
    }, "Uploading…");
  });

  into(datasets, async () => {
    const list = await api("/v1/datasets", { signal });
    clear(datasets, list.length ? table(["dataset", "status", "size#", "uploaded"], list.map((d) => h("tr", {},
      h("td", {}, h("a", { href: `#/train/dataset/${d.id}` }, d.name)), h("td", {}, statusBadge(d.status)),
      h("td", { class: "num" }, `${(d.bytes / 1048576).toFixed(1)} MB`), h("td", {}, when(d.created_at)))),
    { caption: "Newest first" }) : h("p", { class: "muted" }, "No dataset yet."));
  });
  into(trainings, async () => {
    const [classifiers, captioners] = await Promise.all(["train_classifier", "train_captioner"].map((kind) =>
      api(`/v1/jobs${query({ kind, limit: 10 })}`, { signal })));
    const jobs = [...classifiers.data, ...captioners.data].sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
    clear(trainings, jobs.length ? table(["job", "model", "status", "started"], jobs.map((job) => h("tr", {},
      h("td", {}, h("a", { href: `#/train/job/${job.id}` }, job.id)), h("td", {}, job.params.name),
      h("td", {}, statusBadge(job.status)), h("td", {}, when(job.created_at)))), { caption: "Newest first" })
      : h("p", { class: "muted" }, "No training yet."));
  });
}

// --- a dataset: its report, and the training form -------------------------------------------------------------

async function renderDataset(view, datasetId, signal, navigate) {
  const body = h("div", {});
  add(view, pageTitle("Dataset"), h("p", {}, h("a", { href: "#/train" }, "← Train")), body);
  let dataset = await api(`/v1/datasets/${datasetId}`, { signal });
  if (dataset.status === "analyzing") {
    const line = jobStatusLine("Analysis");
    clear(body, h("p", {}, `${dataset.name}: analysing…`), line);
    if (dataset.job_id) await followJob(dataset.job_id, { onUpdate: (j) => line.update(j), signal });
    dataset = await api(`/v1/datasets/${datasetId}`, { signal });
  }
  clear(body, definitionList([
    ["Name", dataset.name], ["Id", h("code", {}, dataset.id)], ["Status", statusBadge(dataset.status)],
    ["Size", `${(dataset.bytes / 1048576).toFixed(2)} MB`], ["sha256", h("code", {}, dataset.sha256)],
    ["Analysis job", dataset.job_id ? h("a", { href: `#/job/${dataset.job_id}` }, dataset.job_id) : null],
  ]));
  if (dataset.status === "failed") {
    add(body, errorBox(dataset.error || new Error("The analysis failed.")));
    return;
  }
  const report = dataset.report || {};
  add(body, reportView(report), trainingForm(dataset, report, signal, navigate));
}

function reportView(report) {
  const warnings = report.warnings || [];
  const parts = [h("h2", {}, "Report")];
  if (warnings.length) {
    parts.push(h("div", { class: "notice warn", role: "note" }, h("strong", {}, "Warnings"),
      h("ul", { class: "warnings" }, warnings.map((warning) => h("li", {
        class: /more than one class|leak/.test(warning) ? "leakage" : "",
      }, warning)))));
  } else {
    parts.push(h("p", { class: "notice ok" }, "No warnings."));
  }
  if (report.kind === "captions") {
    parts.push(definitionList([
      ["Layout", report.layout], ["Images", report.num_images], ["Captions", report.num_captions],
      ["Captions per image", report.captions_per_image ? `${report.captions_per_image.min}–${report.captions_per_image.max} (mean ${report.captions_per_image.mean})` : null],
      ["Vocabulary", report.vocabulary ? `${report.vocabulary.size} words (of ${report.vocabulary.all_words}) seen ${report.vocabulary.min_word_count}+ times` : null],
      ["Caption length", report.caption_length ? Object.entries(report.caption_length).map(([k, v]) => `${k} ${v}`).join(" · ") : null],
      ["Splits", report.splits ? Object.entries(report.splits).map(([k, v]) => `${k} ${v}`).join(" · ") || "none" : null],
      ["Missing images", report.missing_images?.count], ["Uncaptioned images", report.uncaptioned_images?.count],
      ["Undecodable", report.undecodable?.count],
    ]));
    return h("section", { class: "report" }, parts);
  }
  const classes = report.classes || {};
  const most = Math.max(1, ...Object.values(classes));
  const duplicates = report.duplicates || {};
  parts.push(definitionList([
    ["Images", report.num_images], ["Classes", report.num_classes],
    ["Undecodable files", report.undecodable?.count ?? 0],
    ["Exact duplicates", duplicates.exact_count ?? 0], ["Near duplicates", duplicates.near_count ?? 0],
    ["Leakage (across classes)", `${(duplicates.cross_class || []).length} groups`],
  ]));
  parts.push(table(["class", "images#", ""], Object.entries(classes).map(([label, count]) => h("tr", {},
    h("td", {}, label), h("td", { class: "num" }, String(count)),
    h("td", { class: "bar-cell" }, h("meter", { min: 0, max: most, value: count, "aria-label": `${label}: ${count} images` })))),
  { caption: "Images per class" }));
  if ((duplicates.cross_class || []).length) {
    parts.push(h("details", { class: "leakage-groups" }, h("summary", {}, "The same image under several classes"),
      h("ul", {}, duplicates.cross_class.map((group) => h("li", {}, group.join(", "))))));
  }
  return h("section", { class: "report" }, parts);
}

function trainingForm(dataset, report, signal, navigate) {
  const captions = report.kind === "captions";
  const number = (name, value, attrs = {}) => h("input", { type: "number", name, value, ...attrs });
  const status = h("div", { role: "status", "aria-live": "polite" });
  const nameInput = h("input", { type: "text", name: "name", required: true, pattern: "[a-z0-9][a-z0-9._\\-]{0,62}",
    value: dataset.name.toLowerCase().replace(/[^a-z0-9._-]+/g, "-").replace(/^[^a-z0-9]+/, "").slice(0, 63) || "model" });
  const fields = captions ? [
    field("Model name", nameInput, "Lower case, digits, . _ -; each training adds a version"),
    field("Architecture", select("architecture", [["merge", "merge"], ["inject", "inject"]], "merge")),
    h("div", { class: "row" },
      field("Epochs", number("epochs", 20, { min: 1, max: 500 })),
      field("Min word count", number("min_word_count", 2, { min: 1 })),
      field("Beam width", number("beam_width", 3, { min: 1, max: 20 }), "For the BLEU evaluation")),
    field("Seed", number("seed", 0, { min: 0 })),
  ] : [
    field("Model name", nameInput, "Lower case, digits, . _ -; each training adds a version"),
    field("Balance", select("balance", ["none", "undersample", "oversample", "class_weight"], "none")),
    checkbox("Augment (flips, rotations, crops, colour jitter, noise)", h("input", { name: "augment" })),
    h("div", { class: "row" },
      field("Epochs", number("epochs", 30, { min: 1, max: 500 })),
      field("Validation share", number("val_fraction", 0.2, { min: 0.05, max: 0.85, step: 0.05 })),
      field("Target precision", number("target_precision", 0.9, { min: 0.05, max: 1, step: 0.01 }))),
    field("Seed", number("seed", 0, { min: 0 })),
  ];
  const form = h("form", { class: "card", "aria-label": captions ? "Train a captioner" : "Train a classifier" },
    h("h2", {}, captions ? "Train a captioner" : "Train a classifier"), fields,
    h("button", { type: "submit", class: "primary" }, "Start training"), status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await into(status, async () => {
      const job = await api(captions ? "/v1/train/captioner" : "/v1/train/classifier",
        { method: "POST", body: { dataset: dataset.id, ...formValues(form) }, signal });
      navigate(`#/train/job/${job.id}`);
    }, "Starting…");
  });
  return form;
}

// --- a training job, live ---------------------------------------------------------------------------------------

async function renderTraining(view, jobId, signal) {
  const line = jobStatusLine("Training");
  const charts = h("div", { class: "charts" });
  const results = h("div", { class: "training-results" });
  add(view, pageTitle("Training"), h("p", {}, h("a", { href: "#/train" }, "← Train")), line, charts, results);
  const epochs = new Map(); // epoch -> {loss, val_loss, accuracy, val_accuracy, dev_bleu4}
  let kind = null;
  const update = (job) => {
    kind = job.kind;
    line.update(job);
    const p = job.progress || {};
    if (job.kind === "train_classifier" && p.phase === "training" && "loss" in p) epochs.set(p.done, { ...p, epoch: p.done });
    if (job.kind === "train_captioner" && p.stage === "train" && "loss" in p) epochs.set(p.epoch, p);
    const history = job.output?.metrics?.history;
    if (history) for (const record of history) epochs.set(record.epoch, record);
    drawCharts(charts, kind, epochs, job.params?.epochs);
  };
  const job = await api(`/v1/jobs/${jobId}`, { signal });
  update(job);
  const final = TERMINAL.has(job.status) ? job : await followJob(jobId, { onUpdate: update, signal });
  update(final);
  clear(results, ...trainingResults(final));
}

function drawCharts(element, kind, epochs, maxEpochs) {
  const records = [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
  const points = (key) => records.filter((r) => typeof r[key] === "number").map((r) => [r.epoch, r[key]]);
  const loss = lineChart([{ name: "training loss", points: points("loss") }, { name: "validation loss", points: points("val_loss") }],
    { title: `Loss per epoch${maxEpochs ? ` (at most ${maxEpochs})` : ""}` });
  const second = kind === "train_captioner"
    ? lineChart([{ name: "dev BLEU-4", points: points("dev_bleu4") }], { title: "Dev BLEU-4", yMin: 0, yMax: 1 })
    : lineChart([{ name: "training accuracy", points: points("accuracy") }, { name: "validation accuracy", points: points("val_accuracy") }],
      { title: "Accuracy per epoch", yMin: 0, yMax: 1 });
  clear(element, loss, second);
  element.dataset.epochs = String(records.length);
}

function trainingResults(job) {
  if (job.status !== "succeeded") return [job.error ? errorBox(job.error) : h("p", { class: "notice" }, `The training ended ${job.status}.`)];
  const output = job.output || {};
  const metrics = output.metrics || {};
  const model = output.model || {};
  const head = h("p", { class: "notice ok" }, "Registered ", h("a", { href: `#/models?name=${encodeURIComponent(model.name)}` },
    `${model.name} version ${model.version}`), ".");
  if (job.kind === "train_captioner") {
    const bleu = output.bleu || metrics.bleu || {};
    return [head,
      table(["decoding", "BLEU-1#", "BLEU-2#", "BLEU-3#", "BLEU-4#"], [["greedy", bleu.greedy], [`beam-${bleu.beam_width}`, bleu.beam]]
        .map(([label, scores]) => h("tr", {}, h("td", {}, label), (scores || []).map((s) => h("td", { class: "num" }, fixed(s, 3))))),
      { caption: `BLEU on the ${metrics.evaluated_on || "test"} split` }),
      (output.examples || []).length ? h("section", {}, h("h2", {}, "Examples"), h("ul", { class: "examples" },
        output.examples.map((example) => h("li", {}, h("strong", {}, example.image),
          h("div", {}, "greedy: ", example.greedy), h("div", {}, "beam: ", example.beam),
          h("div", { class: "muted" }, "references: ", (example.references || []).join(" / ")))))) : null];
  }
  const perClass = metrics.per_class || {};
  const matrix = metrics.confusion_matrix || {};
  return [head,
    definitionList([["Macro F1", fixed(metrics.macro_f1, 3)], ["Accuracy", fixed(metrics.accuracy, 3)],
      ["Unknown below", fixed(metrics.threshold, 3)], ["Epochs run", metrics.epochs_run], ["Best epoch", metrics.best_epoch],
      ["Validation images", metrics.val_size]]),
    table(["class", "precision#", "recall#", "F1#", "support#"], Object.entries(perClass).map(([label, row]) => h("tr", {},
      h("td", {}, label), h("td", { class: "num" }, fixed(row.precision, 3)), h("td", { class: "num" }, fixed(row.recall, 3)),
      h("td", { class: "num" }, fixed(row.f1, 3)), h("td", { class: "num" }, String(row.support)))),
    { caption: "Per class (validation set)", className: "per-class" }),
    matrix.labels ? heatMap(matrix.labels, matrix.matrix) : null];
}
