// Try: one photo, one of the platform's image tasks, the answer drawn on the page with the job's provenance.

import { api, submitJob, uploadImage } from "../api.js";
import {
  add, checkbox, clear, errorBox, field, fixed, formValues, h, imageElement, into, jobStatusLine, pageTitle,
  percent, photoPicker, provenance, select, table,
} from "../ui.js";
import { facesFigure } from "./faces.js";

const TASKS = [
  ["classify", "Classify", "ImageNet labels (or your own classifier's) with scores"],
  ["caption", "Caption", "Captions with their log-probabilities (needs a captioner of yours)"],
  ["faces", "Detect faces", "Boxes, landmarks and each face's expression"],
  ["meme", "Meme", "The main face's expression picks a caption"],
];

export function render(view, { signal, query }) {
  let file = null;
  let uploaded = null; // {file, image}: the photo is uploaded once, then referred to by id
  let photoUrl = null;

  const picker = photoPicker({
    label: "Photo",
    name: "photo",
    onFile(chosen) {
      file = chosen;
      uploaded = null;
      if (photoUrl) URL.revokeObjectURL(photoUrl);
      photoUrl = URL.createObjectURL(chosen);
    },
  });
  const selected = TASKS.some(([value]) => value === query.get("task")) ? query.get("task") : "classify";
  const taskChoice = h("fieldset", { class: "choices" }, h("legend", {}, "Task"),
    TASKS.map(([value, label, hint]) => h("label", { class: "choice" },
      h("input", { type: "radio", name: "task", value, checked: value === selected ? true : null }),
      h("span", {}, h("strong", {}, label), h("small", { class: "muted" }, hint)))));
  const options = h("div", { class: "task-options" });
  const runButton = h("button", { type: "submit", class: "primary" }, "Run");
  const form = h("form", { class: "card try-form", "aria-label": "Try a task" }, picker, taskChoice, options,
    h("div", { class: "actions" }, runButton));
  const result = h("section", { class: "result", "aria-label": "Result" });
  add(view, pageTitle("Try"),
    h("p", { class: "lede" }, "Choose a photo and a task. The console uploads the photo (", h("code", {}, "POST /v1/images"),
      "), submits the job with ", h("code", {}, "Prefer: wait=30"), " and follows it until it ends."),
    h("div", { class: "two-columns" }, form, result));

  const modelLists = api("/v1/models", { signal }).catch(() => []);
  const showOptions = () => {
    const task = form.elements.task.value;
    clear(options, ...optionFields(task, modelLists));
  };
  taskChoice.addEventListener("change", showOptions);
  showOptions();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file) {
      clear(result, errorBox(new Error("Choose a photo first.")));
      picker.input.focus();
      return;
    }
    const task = form.elements.task.value;
    const values = formValues(form);
    delete values.task;
    runButton.disabled = true;
    const line = jobStatusLine(TASKS.find(([v]) => v === task)[1]);
    try {
      await into(result, async () => {
        if (!uploaded || uploaded.file !== file) uploaded = { file, image: await uploadImage(file, signal) };
        clear(result, line);
        const job = await submitJob(PATHS[task], { image: uploaded.image.id, ...values },
          { onUpdate: (j) => line.update(j), signal });
        clear(result, line, ...showResult(task, job, photoUrl), provenance(job.provenance));
      }, "Uploading the photo…");
    } finally {
      runButton.disabled = false;
    }
  });
}

const PATHS = { classify: "/v1/classify", caption: "/v1/caption", faces: "/v1/faces/detect", meme: "/v1/memes" };

function modelSelect(kind, lists) {
  const control = select("model", [["", "default"]], "");
  lists.then((models) => {
    for (const model of models.filter((m) => m.kind === kind)) {
      control.append(h("option", { value: model.name }, `${model.name} (v${model.latest})`));
    }
  });
  return control;
}

function optionFields(task, lists) {
  const number = (name, value, min, max) => h("input", { type: "number", name, value, min, max, inputmode: "numeric" });
  if (task === "classify") {
    return [
      field("Model", modelSelect("classify", lists)),
      field("Top k", number("top_k", 5, 1, 1000)),
      field("Expected label", h("input", { type: "text", name: "expected_label", placeholder: "e.g. espresso" }),
        "Optional: the answer says match, mismatch or unknown"),
    ];
  }
  if (task === "caption") {
    return [
      field("Model", modelSelect("caption", lists)),
      field("Beam width", number("beam_width", 3, 1, 20), "1 is greedy decoding"),
      field("Captions", number("num_captions", 3, 1, 20), "At most the beam width"),
    ];
  }
  if (task === "faces") {
    return [
      checkbox("Read expressions", h("input", { name: "expressions", checked: true })),
      field("Landmarks", select("landmarks", [["5", "5 points"], ["68", "68 points"]], "5")),
    ];
  }
  return [
    field("Top text", h("input", { type: "text", name: "top_text", maxlength: 200 }), "Optional: overrides the caption"),
    field("Bottom text", h("input", { type: "text", name: "bottom_text", maxlength: 200 })),
  ];
}

function showResult(task, job, photoUrl) {
  if (job.status !== "succeeded") {
    return [job.error ? errorBox(job.error) : h("p", { class: "notice" }, `The job ended ${job.status}.`)];
  }
  const output = job.output || {};
  if (task === "classify") return classifyResult(output);
  if (task === "caption") return captionResult(output);
  if (task === "faces") return [facesFigure(photoUrl, output.faces || [], { expressions: true }), faceList(output.faces || [])];
  return memeResult(output);
}

function classifyResult(output) {
  const match = output.match;
  return [
    h("h2", {}, "Labels"),
    output.unknown ? h("p", { class: "notice warn" }, "Unknown: the top score is under the model's threshold.") : null,
    match && match.expected ? h("p", { class: `notice verdict-${match.verdict}` },
      `Verdict: ${match.verdict} (expected ${match.expected}, predicted ${match.predicted})`) : null,
    h("ol", { class: "labels" }, (output.labels || []).map((label) => h("li", {},
      h("span", { class: "label-name" }, label.label),
      h("meter", { min: 0, max: 1, value: label.score, "aria-label": `score of ${label.label}` }),
      h("span", { class: "score" }, percent(label.score))))),
  ];
}

function captionResult(output) {
  return [
    h("h2", {}, "Captions"),
    table(["rank", "caption", "log-prob#"], (output.captions || []).map((caption, i) => h("tr", {},
      h("td", {}, String(i + 1)), h("td", { class: "caption-text" }, caption.text),
      h("td", { class: "num" }, fixed(caption.log_prob, 3)))), { caption: "Best first" }),
  ];
}

function faceList(faces) {
  if (!faces.length) return h("p", { class: "notice" }, "No face found.");
  return table(["face", "box (x, y, w, h)", "score#", "expression"], faces.map((face, i) => h("tr", {},
    h("td", {}, String(i + 1)), h("td", {}, face.box.join(", ")), h("td", { class: "num" }, fixed(face.score, 2)),
    h("td", {}, face.expression ? `${face.expression.label} (${percent(face.expression.scores[face.expression.label])})` : "–"))),
  { caption: `${faces.length} ${faces.length === 1 ? "face" : "faces"}` });
}

function memeResult(output) {
  const caption = output.caption || {};
  return [
    h("h2", {}, "Meme"),
    h("figure", { class: "meme" },
      imageElement(output.image_id, `Meme: ${caption.top || ""} ${caption.bottom || ""}`.trim()),
      h("figcaption", {}, output.expression ? `Expression: ${output.expression.label}. ` : "",
        h("a", { href: `#/image/${output.image_id}` }, output.image_id))),
  ];
}
