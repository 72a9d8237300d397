// Faces: collections, their subjects with face counts, enrollment by upload, and 1:N identify.
// Also the photo-with-boxes figure the Try page uses.

import { api, submitJob, uploadImage } from "../api.js";
import {
  add, clear, errorBox, field, fixed, formValues, h, into, jobStatusLine, pageTitle, photoPicker, svg, table,
  when,
} from "../ui.js";

// The photo with an SVG laid over it in the photo's own pixel coordinates: one box per face, its landmarks,
// and a label (the expression, or the best match).
export function facesFigure(photoUrl, faces, { labelOf } = {}) {
  const label = labelOf || ((face) => (face.expression ? face.expression.label : ""));
  const overlay = svg("svg", {
    class: "overlay", preserveAspectRatio: "none", role: "img",
    "aria-label": faces.length
      ? `${faces.length} ${faces.length === 1 ? "face" : "faces"}: ${faces.map((f, i) => `${i + 1} ${label(f) || ""}`.trim()).join(", ")}`
      : "no face found",
  });
  const img = h("img", { src: photoUrl, alt: "The photo" });
  const draw = () => {
    const width = img.naturalWidth || 1;
    const height = img.naturalHeight || 1;
    overlay.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const fontSize = Math.max(12, Math.round(width / 32));
    clear(overlay, faces.map((face, i) => {
      const [x, y, w, hgt] = face.box;
      const text = `${i + 1}${label(face) ? " · " + label(face) : ""}`;
      return svg("g", { class: "face", dataset: { face: String(i + 1) } },
        svg("rect", { class: "face-box", x, y, width: w, height: hgt, "vector-effect": "non-scaling-stroke" }),
        (face.landmarks || []).map(([lx, ly]) => svg("circle", {
          class: "landmark", cx: lx, cy: ly, r: Math.max(1.5, width / 250),
        })),
        svg("text", { class: "face-label", x, y: Math.max(fontSize, y - fontSize * 0.3), "font-size": fontSize }, text));
    }));
  };
  if (img.complete && img.naturalWidth) draw();
  else img.addEventListener("load", draw, { once: true });
  return h("figure", { class: "stage" }, h("div", { class: "stage-inner" }, img, overlay));
}

export async function render(view, { args, signal }) {
  if (args.length) return renderCollection(view, args[0], signal);
  const list = h("div", { class: "collections" });
  const nameInput = h("input", { type: "text", name: "name", required: true, maxlength: 200, autocomplete: "off" });
  const createStatus = h("div", { role: "status", "aria-live": "polite" });
  const create = h("form", { class: "card inline-form", "aria-label": "New collection" },
    h("h2", {}, "New collection"),
    field("Name", nameInput),
    field("Threshold", h("input", { type: "number", name: "threshold", value: "0.6", step: "0.01", min: "0.01", max: "2" }),
      "Face distance under which two faces are one person"),
    h("button", { type: "submit", class: "primary" }, "Create"), createStatus);
  add(view, pageTitle("Faces"),
    h("p", { class: "lede" }, "Collections of people: enroll their faces, then identify photos against them."),
    h("div", { class: "two-columns" }, h("section", { "aria-label": "Collections" }, h("h2", {}, "Collections"), list), create));

  const load = () => into(list, async () => {
    const collections = await api("/v1/collections", { signal });
    clear(list, collections.length
      ? table(["name", "threshold#", "created"], collections.map((c) => h("tr", {},
        h("td", {}, h("a", { href: `#/faces/${encodeURIComponent(c.name)}` }, c.name)),
        h("td", { class: "num" }, fixed(c.threshold, 2)), h("td", {}, when(c.created_at)))), { caption: "Your collections" })
      : h("p", { class: "muted" }, "No collection yet: create one."));
  });
  create.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const collection = await api("/v1/collections", { method: "POST", body: formValues(create), signal });
      clear(createStatus, h("p", { class: "notice ok" }, `Created ${collection.name}.`));
      create.reset();
      await load();
    } catch (error) {
      clear(createStatus, errorBox(error));
    }
  });
  await load();
}

async function renderCollection(view, name, signal) {
  const path = `/v1/collections/${encodeURIComponent(name)}`;
  const subjects = h("div", { class: "subjects" });
  const subjectName = h("input", { type: "text", name: "name", required: true, maxlength: 200, autocomplete: "off" });
  const addStatus = h("div", { role: "status", "aria-live": "polite" });
  const addForm = h("form", { class: "inline-form", "aria-label": "Add a subject" },
    field("New subject", subjectName), h("button", { type: "submit" }, "Add"), addStatus);
  const enrollStatus = h("div", { class: "enroll-status", role: "status", "aria-live": "polite" });
  add(view, pageTitle(`Collection ${name}`),
    h("p", {}, h("a", { href: "#/faces" }, "← All collections")),
    h("section", { class: "card", "aria-label": "Subjects" }, h("h2", {}, "Subjects"), subjects, enrollStatus, addForm),
    identifySection(name, signal));

  const load = () => into(subjects, async () => {
    const list = await api(`${path}/subjects`, { signal });
    clear(subjects, list.length ? table(["subject", "faces#", "enroll a photo", ""], list.map((subject) => {
      const enroll = h("input", { type: "file", accept: "image/*", "aria-label": `Enroll a photo of ${subject.name}`,
        class: "enroll-input", dataset: { subject: subject.name } });
      enroll.addEventListener("change", () => enrollFace(subject.name, enroll.files[0]));
      const remove = h("button", { type: "button", class: "link-button danger" }, "Delete");
      remove.addEventListener("click", async () => {
        if (!window.confirm(`Delete ${subject.name} and their face embeddings?`)) return;
        try {
          const answer = await api(`${path}/subjects/${encodeURIComponent(subject.name)}`, { method: "DELETE", signal });
          clear(enrollStatus, h("p", { class: "notice ok" }, `Deleted ${answer.deleted} (${answer.embeddings_deleted} faces).`));
          await load();
        } catch (error) {
          clear(enrollStatus, errorBox(error));
        }
      });
      return h("tr", { dataset: { subject: subject.name } }, h("td", {}, subject.name),
        h("td", { class: "num face-count" }, String(subject.faces)), h("td", {}, enroll), h("td", {}, remove));
    }), { caption: "Subjects and their enrolled faces" }) : h("p", { class: "muted" }, "No subject yet: add one, then enroll photos."));
  });

  async function enrollFace(subject, file) {
    if (!file) return;
    const line = jobStatusLine(`Enrolling ${subject}`);
    clear(enrollStatus, line);
    try {
      const image = await uploadImage(file, signal);
      const job = await submitJob(`${path}/subjects/${encodeURIComponent(subject)}/faces`, { image: image.id },
        { onUpdate: (j) => line.update(j), signal });
      if (job.status === "succeeded") {
        const warnings = (job.output.warnings || []).map((w) => h("li", {}, w.message || w.code));
        add(enrollStatus, h("p", { class: "notice ok" }, `Enrolled: ${subject} has ${job.output.faces_enrolled} `,
          job.output.faces_enrolled === 1 ? "face." : "faces."), warnings.length ? h("ul", { class: "warnings" }, warnings) : null);
        await load();
      } else {
        add(enrollStatus, errorBox(job.error || new Error(`The enrollment ended ${job.status}.`)));
      }
    } catch (error) {
      if (error.name !== "AbortError") add(enrollStatus, errorBox(error));
    }
  }

  addForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api(`${path}/subjects`, { method: "POST", body: { name: subjectName.value.trim() }, signal });
      clear(addStatus);
      addForm.reset();
      await load();
    } catch (error) {
      clear(addStatus, errorBox(error));
    }
  });
  await load();
}

function identifySection(collection, signal) {
  let file = null;
  let photoUrl = null;
  const picker = photoPicker({
    label: "Photo to identify", name: "identify",
    onFile(chosen) {
      file = chosen;
      if (photoUrl) URL.revokeObjectURL(photoUrl);
      photoUrl = URL.createObjectURL(chosen);
    },
  });
  const result = h("div", { class: "identify-result" });
  const form = h("form", { class: "card", "aria-label": "Identify" },
    h("h2", {}, "Identify"), picker,
    h("div", { class: "row" },
      field("Matches per face", h("input", { type: "number", name: "top_k", value: "3", min: "1", max: "20" })),
      field("Threshold", h("input", { type: "number", name: "threshold", step: "0.01", min: "0.01", max: "2", placeholder: "collection's" }))),
    h("button", { type: "submit", class: "primary" }, "Identify"), result);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!file) {
      clear(result, errorBox(new Error("Choose a photo first.")));
      return;
    }
    const line = jobStatusLine("Identify");
    await into(result, async () => {
      const image = await uploadImage(file, signal);
      clear(result, line);
      const job = await submitJob("/v1/faces/identify", { image: image.id, collection, ...formValues(form) },
        { onUpdate: (j) => line.update(j), signal });
      if (job.status !== "succeeded") {
        add(result, errorBox(job.error || new Error(`The job ended ${job.status}.`)));
        return;
      }
      const faces = job.output.faces || [];
      const best = (face) => (face.matches[0] ? `${face.matches[0].subject} ${fixed(face.matches[0].distance, 3)}` : "unknown");
      add(result, facesFigure(photoUrl, faces, { labelOf: best }),
        faces.length ? table(["face", "subject", "distance#"], faces.flatMap((face, i) => (face.matches.length
          ? face.matches.map((match, k) => h("tr", { class: k ? "" : "first-match" },
            h("td", {}, k ? "" : String(i + 1)), h("td", { class: "match-subject" }, match.subject),
            h("td", { class: "num" }, fixed(match.distance, 4))))
          : [h("tr", {}, h("td", {}, String(i + 1)), h("td", { class: "muted" }, "no match within the threshold"), h("td", {}, "–"))])),
        { caption: `Matches per face (threshold ${fixed(job.output.threshold, 2)}, ${job.output.search} search)` })
          : h("p", { class: "notice" }, "No face found."));
    }, "Uploading the photo…");
  });
  return form;
}
