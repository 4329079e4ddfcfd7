// Charts drawn as SVG by hand: two chart types, no library to vendor.
import { h, num } from "./lib.js";

export const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function scale(domain, range) {
  const [d0, d1] = domain;
  const [r0, r1] = range;
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

function ticks([lo, hi], count = 5) {
  const step = (hi - lo) / (count - 1 || 1);
  return Array.from({ length: count }, (_, i) => lo + i * step);
}

function padded(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.08;
  return [lo - pad, hi + pad];
}

// Each variant's mean reward with its interval, one row each.
export function intervalChart(variants) {
  const rows = variants.filter((v) => v.mean_reward !== null);
  const width = 560, left = 120, right = 20, rowHeight = 34, top = 16;
  const height = top + rowHeight * Math.max(1, variants.length) + 28;
  const values = rows.flatMap((v) => (v.reward_ci ? v.reward_ci : [v.mean_reward]));
  const domain = padded(values.length ? values : [0, 1]);
  const x = scale(domain, [left, width - right]);
  const svg = h("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "mean reward and interval by variant", "data-testid": "interval-chart",
    "data-finished": variants.reduce((n, v) => n + (v.finished || 0), 0) });
  for (const t of ticks(domain)) {
    svg.append(h("line", { x1: x(t), x2: x(t), y1: top - 6, y2: height - 24, class: "grid" }),
      h("text", { x: x(t), y: height - 8, class: "tick", "text-anchor": "middle" }, num(t, 2)));
  }
  variants.forEach((v, i) => {
    const y = top + rowHeight * i + rowHeight / 2;
    const color = COLORS[i % COLORS.length];
    svg.append(h("text", { x: 8, y: y + 4, class: "label" }, v.name));
    if (v.mean_reward === null) {
      svg.append(h("text", { x: left, y: y + 4, class: "tick" }, "no reward yet"));
      return;
    }
    if (v.reward_ci) {
      const [lo, hi] = v.reward_ci;
      svg.append(h("line", { x1: x(lo), x2: x(hi), y1: y, y2: y, stroke: color, "stroke-width": 3 }),
        h("line", { x1: x(lo), x2: x(lo), y1: y - 7, y2: y + 7, stroke: color, "stroke-width": 2 }),
        h("line", { x1: x(hi), x2: x(hi), y1: y - 7, y2: y + 7, stroke: color, "stroke-width": 2 }));
    }
    svg.append(h("circle", { cx: x(v.mean_reward), cy: y, r: 5, fill: color },
      h("title", {}, `${v.name}: ${num(v.mean_reward)} [${v.reward_ci ? v.reward_ci.map((c) => num(c)).join(", ") : "–"}]`)));
  });
  return svg;
}

// Each variant's mean reward (line) and interval (band) as its rewards came in.
export function trajectoryChart(trajectories, names) {
  const width = 560, height = 240, left = 44, right = 16, top = 12, bottom = 30;
  const series = names.map((name) => trajectories[name] || []);
  const all = series.flat();
  const svg = h("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "mean reward over time by variant", "data-testid": "trajectory-chart",
    "data-points": all.length, "data-rewards": series.reduce((n, s) => n + (s.length ? s[s.length - 1].n : 0), 0) });
  if (!all.length) {
    svg.append(h("text", { x: width / 2, y: height / 2, class: "tick", "text-anchor": "middle" },
      "no reward yet: the chart fills in as rollouts finish"));
    return svg;
  }
  const maxN = Math.max(...all.map((p) => p.n));
  const x = scale([0, maxN], [left, width - right]);
  const y = scale(padded(all.flatMap((p) => (p.ci ? p.ci : [p.mean]))), [height - bottom, top]);
  const yDomain = padded(all.flatMap((p) => (p.ci ? p.ci : [p.mean])));
  for (const t of ticks(yDomain)) {
    svg.append(h("line", { x1: left, x2: width - right, y1: y(t), y2: y(t), class: "grid" }),
      h("text", { x: left - 6, y: y(t) + 4, class: "tick", "text-anchor": "end" }, num(t, 2)));
  }
  for (const t of ticks([0, maxN])) {
    svg.append(h("text", { x: x(t), y: height - 10, class: "tick", "text-anchor": "middle" }, Math.round(t)));
  }
  series.forEach((points, i) => {
    const color = COLORS[i % COLORS.length];
    const banded = points.filter((p) => p.ci);
    if (banded.length > 1) {
      const upper = banded.map((p) => `${x(p.n)},${y(p.ci[1])}`);
      const lower = banded.map((p) => `${x(p.n)},${y(p.ci[0])}`).reverse();
      svg.append(h("polygon", { points: [...upper, ...lower].join(" "), fill: color, "fill-opacity": 0.15 }));
    }
    svg.append(h("polyline", { points: points.map((p) => `${x(p.n)},${y(p.mean)}`).join(" "), fill: "none",
      stroke: color, "stroke-width": 2, "data-variant": names[i] }));
  });
  return svg;
}

export function legend(names) {
  return h("div", { class: "legend" }, names.map((name, i) =>
    h("span", {}, h("i", { class: `swatch c${i % COLORS.length}` }), name)));
}
