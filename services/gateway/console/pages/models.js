// Models: the registry (built-in and your own), each with its versions, metrics and the device it ran on.

import { api } from "../api.js";
import { add, clear, fixed, h, into, jsonBlock, pageTitle, short, table, when } from "../ui.js";

export async function render(view, { query: params, signal }) {
  const list = h("div", { class: "models" });
  add(view, pageTitle("Models"),
    h("p", { class: "lede" }, "The registry: built-in models and the ones you trained or imported. Each training or import adds a version."),
    list);
  await into(list, async () => {
    const models = await api("/v1/models", { signal });
    const open = params.get("name");
    clear(list, models.length ? models.map((model) => modelCard(model, model.name === open)) : h("p", { class: "muted" }, "No model."));
    if (open) list.querySelector(`[data-model="${CSS.escape(open)}"]`)?.scrollIntoView();
  });
}

function modelCard(model, open) {
  const latest = model.versions.find((v) => v.version === model.latest) || model.versions.at(-1) || {};
  return h("section", { class: "card model", dataset: { model: model.name }, "aria-label": model.name },
    h("h2", {}, model.name, " ", h("span", { class: "tag" }, model.kind), model.builtin ? h("span", { class: "tag muted" }, "built-in") : null),
    table(["version", "status", "device", "weights sha256", "metrics", "about", "created"], model.versions.map((version) => h("tr", {},
      h("td", {}, version.version === model.latest ? `${version.version} (latest)` : version.version),
      h("td", {}, version.status), h("td", {}, version.device || "not served yet"),
      h("td", {}, version.weights_sha256 ? h("code", { title: version.weights_sha256 }, short(version.weights_sha256)) : "–"),
      h("td", {}, metricSummary(version.metrics)), h("td", {}, cardSummary(version.card)),
      h("td", {}, when(version.created_at)))),
    { caption: `${model.versions.length} ${model.versions.length === 1 ? "version" : "versions"}` }),
    h("details", { open: open ? true : null }, h("summary", {}, "Metrics and model card of the latest version"),
      jsonBlock({ metrics: withoutHistory(latest.metrics), card: latest.card }, `${model.name} details`)));
}

function metricSummary(metrics = {}) {
  const parts = [];
  if (typeof metrics.macro_f1 === "number") parts.push(`macro F1 ${fixed(metrics.macro_f1, 3)}`);
  if (typeof metrics.accuracy === "number") parts.push(`accuracy ${fixed(metrics.accuracy, 3)}`);
  if (typeof metrics.top1 === "number") parts.push(`top-1 ${fixed(metrics.top1, 3)}`);
  if (metrics.bleu && metrics.bleu.beam) parts.push(`BLEU-4 beam ${fixed(metrics.bleu.beam[3], 3)}`);
  if (typeof metrics.threshold === "number") parts.push(`unknown < ${fixed(metrics.threshold, 2)}`);
  if (!parts.length) {
    // Anything else scalar the version records (a built-in's threshold, say), by name.
    for (const [name, value] of Object.entries(metrics)) {
      if (parts.length < 3 && (typeof value === "number" || typeof value === "string")) {
        parts.push(`${name.replace(/_/g, " ")} ${typeof value === "number" ? fixed(value, 3) : value}`);
      }
    }
  }
  return parts.join(" · ") || "–";
}

function cardSummary(card = {}) {
  const parts = [card.pipeline, card.default_scheduler, card.default_size ? card.default_size.join(" × ") : null,
    card.backbone, card.architecture, Array.isArray(card.labels) ? `${card.labels.length} labels` : null, card.dtype];
  return parts.filter((part) => typeof part === "string" && part).join(" · ") || "–";
}

function withoutHistory(metrics) {
  if (!metrics) return metrics;
  const { history, ...rest } = metrics;
  return history ? { ...rest, history: `${history.length} epochs (see the training job)` } : rest;
}
