// Inline SVG line charts (training curves) and a heat-map table (confusion matrix). No library.

import { h, svg } from "./ui.js";

const WIDTH = 440;
const HEIGHT = 220;
const PAD = { left: 46, right: 12, top: 12, bottom: 34 };

// series: [{name, points: [[x, y], ...], className}]; options: {title, xLabel, yMin, yMax}
export function lineChart(series, { title, xLabel = "epoch", yMin, yMax } = {}) {
  const all = series.flatMap((s) => s.points).filter(([, y]) => typeof y === "number" && Number.isFinite(y));
  const xs = all.map(([x]) => x);
  const ys = all.map(([, y]) => y);
  const x0 = Math.min(1, ...xs);
  const x1 = Math.max(x0 + 1, ...xs);
  let y0 = yMin ?? Math.min(...ys, 0);
  let y1 = yMax ?? Math.max(...ys, y0 + 1e-6);
  if (!all.length) { y0 = yMin ?? 0; y1 = yMax ?? 1; }
  if (y1 - y0 < 1e-9) y1 = y0 + 1;
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const px = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
  const py = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * plotH;

  const grid = [];
  for (let i = 0; i <= 4; i += 1) {
    const y = y0 + ((y1 - y0) * i) / 4;
    grid.push(svg("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: py(y), y2: py(y) }));
    grid.push(svg("text", { class: "tick", x: PAD.left - 6, y: py(y) + 4, "text-anchor": "end" }, tickLabel(y, y1 - y0)));
  }
  const xTicks = niceXTicks(x0, x1);
  for (const x of xTicks) {
    grid.push(svg("text", { class: "tick", x: px(x), y: HEIGHT - PAD.bottom + 17, "text-anchor": "middle" }, String(x)));
  }
  const lines = series.map((s, index) => {
    const points = s.points.filter(([, y]) => typeof y === "number" && Number.isFinite(y));
    const path = points.map(([x, y], i) => `${i ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
    return svg("g", { class: `series series-${index} ${s.className || ""}` },
      points.length > 1 ? svg("path", { d: path }) : null,
      points.map(([x, y]) => svg("circle", { cx: px(x), cy: py(y), r: 3 },
        svg("title", {}, `${s.name}: ${xLabel} ${x}, ${tickLabel(y, 0.001)}`))));
  });
  const description = series.map((s) => {
    const last = s.points.filter(([, y]) => typeof y === "number").at(-1);
    return last ? `${s.name} ${tickLabel(last[1], 0.001)} at ${xLabel} ${last[0]}` : `${s.name}: no points yet`;
  }).join("; ");
  const chart = svg("svg", {
    class: "line-chart", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img",
    "aria-label": `${title || "Chart"}: ${description}`,
  },
  svg("rect", { class: "plot", x: PAD.left, y: PAD.top, width: plotW, height: plotH }),
  grid,
  svg("text", { class: "axis-label", x: PAD.left + plotW / 2, y: HEIGHT - 2, "text-anchor": "middle" }, xLabel),
  lines);
  return h("figure", { class: "chart" },
    title ? h("figcaption", {}, title) : null,
    chart,
    h("ul", { class: "legend" }, series.map((s, index) => h("li", { class: `series-${index}` },
      h("span", { class: "swatch", "aria-hidden": "true" }), s.name))));
}

function tickLabel(value, range) {
  if (range >= 10) return value.toFixed(0);
  if (range >= 1) return value.toFixed(1);
  if (range >= 0.1) return value.toFixed(2);
  return value.toFixed(3);
}

function niceXTicks(x0, x1) {
  const span = x1 - x0;
  const step = Math.max(1, Math.ceil(span / 8));
  const ticks = [];
  for (let x = Math.ceil(x0); x <= x1; x += step) ticks.push(x);
  return ticks;
}

// The confusion matrix as a table of counts whose cells are shaded by their share of the row (true class).
export function heatMap(labels, matrix, { caption = "Confusion matrix (rows: true class, columns: predicted)" } = {}) {
  const head = h("tr", {}, h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "true class")),
    labels.map((label) => h("th", { scope: "col", class: "predicted" }, label)));
  const rows = matrix.map((row, i) => {
    const total = row.reduce((sum, n) => sum + n, 0) || 1;
    return h("tr", {}, h("th", { scope: "row" }, labels[i]),
      row.map((count, j) => {
        const share = count / total;
        const cell = h("td", {
          class: i === j ? "diagonal" : "off",
          title: `true ${labels[i]}, predicted ${labels[j]}: ${count} (${(share * 100).toFixed(0)} % of the row)`,
        }, String(count));
        // Shade by share: the diagonal in the accent colour, confusions in the warning colour.
        cell.style.setProperty("--share", share.toFixed(3));
        if (share > 0.55) cell.classList.add("dark");
        return cell;
      }));
  });
  return h("div", { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption },
    h("table", { class: "heatmap" }, h("caption", {}, caption), h("thead", {}, head), h("tbody", {}, rows)));
}
