// Experiments: the list, and one experiment's live report: per-variant reward with its interval,
// the reward over time, the sequential test's state, promote and stop.
import { act, api, h, link, num, pct, pvalue, throttle, when } from "./lib.js";
import { intervalChart, legend, trajectoryChart } from "./charts.js";

export async function experimentList() {
  const element = h("section", {}, h("h1", {}, "Experiments"));
  const body = h("tbody");
  element.append(h("table", { "data-testid": "experiment-table" },
    h("thead", {}, h("tr", {}, ["name", "status", "variants", "started", "stopped"].map((c) => h("th", {}, c)))), body));
  async function load() {
    const all = await api("/experiments");
    body.replaceChildren(...all.map((e) => h("tr", {},
      h("td", {}, link(`#/experiments/${encodeURIComponent(e.name)}`, e.name)),
      h("td", {}, h("span", { class: `badge e-${e.status}` }, e.status), e.paired ? " paired" : ""),
      h("td", {}, e.variants.map((v) => h("span", { class: "chip" }, `${v.name}: ${v.resources_id}`))),
      h("td", {}, when(e.start_time)), h("td", {}, e.stop_reason || ""))));
    if (!all.length) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No experiment yet.")));
  }
  await load();
  return { element, onEvent: (kind) => { if (kind === "resync" || kind === "registry") load(); } };
}

function variantTable(report) {
  return h("table", { "data-testid": "variant-table" },
    h("thead", {}, h("tr", {}, ["variant", "snapshot", "weight", "units", "rollouts", "finished", "success",
      "mean reward [95% CI]", "p50/p95 s", "errors"].map((c) => h("th", {}, c)))),
    h("tbody", {}, report.variants.map((v) => h("tr", { "data-variant": v.name },
      h("td", {}, v.name), h("td", {}, link(`#/snapshots/${encodeURIComponent(v.resources_id)}`, v.resources_id),
        // What the reference named when each rollout started (a pointer may have moved since).
        (v.ran || []).map((r) => h("div", { class: "muted", "data-testid": `ran-${v.name}` },
          `ran ${r.resources_id} v${r.version}: ${r.rollouts}`))),
      h("td", {}, v.weight), h("td", {}, v.units), h("td", {}, v.rollouts),
      h("td", { "data-testid": `finished-${v.name}` }, v.finished), h("td", {}, pct(v.success_rate)),
      h("td", {}, num(v.mean_reward), v.reward_ci ? ` [${num(v.reward_ci[0])}, ${num(v.reward_ci[1])}]` : ""),
      h("td", {}, v.latency_p50 === null ? "–" : `${num(v.latency_p50, 2)}/${num(v.latency_p95, 2)}`),
      h("td", {}, Object.entries(v.errors).map(([t, n]) => `${t}: ${n}`).join(", "))))));
}

function sequentialState(report) {
  return h("div", { class: "sequential", "data-testid": "sequential" }, report.comparisons.map((c) => {
    const s = c.sequential;
    const n = s ? Math.min(s.n_control, s.n_treatment) : 0;
    const progress = Math.min(1, n / report.min_sample);
    return h("div", { class: "card", "data-variant": c.variant },
      h("h3", {}, `${c.variant} vs ${c.control}: `, h("span", { class: `verdict v-${c.verdict.split(":")[0].replaceAll(" ", "-")}`, "data-testid": `verdict-${c.variant}` }, c.verdict)),
      h("div", { class: "progress", title: `${n} of the ${report.min_sample} needed` },
        h("div", { class: `bar w${Math.round(progress * 20) * 5}` })),
      h("p", {}, `always-valid p = ${pvalue(s ? s.p_value : null)} (alpha ${report.alpha}) · difference ${num(s ? s.diff : null)} · `,
        `n = ${s ? s.n_control : 0} / ${s ? s.n_treatment : 0} · P(beats) ${pct(c.prob_beats)}`),
      (c.regressions || []).length ? h("details", { "data-testid": `regressions-${c.variant}` },
        h("summary", {}, `${c.regressions.length} input(s) worse under ${c.variant}, worst first`),
        h("table", {}, h("tbody", {}, c.regressions.map((r) => h("tr", {}, h("td", {}, r.unit),
          h("td", {}, num(r.control)), h("td", {}, num(r.treatment)), h("td", {}, num(r.delta))))))) : "");
  }));
}

export async function experimentPage(name) {
  const path = `/experiments/${encodeURIComponent(name)}`;
  const element = h("section", { "data-testid": "experiment" });
  const parts = {
    head: h("div"), charts: h("div", { class: "charts" }), table: h("div"), sequential: h("div"), actions: h("div"),
  };
  element.append(h("p", {}, link("#/experiments", "← experiments")), parts.head, parts.charts, parts.sequential,
    parts.table, parts.actions);

  function render(view) {
    const { experiment: exp, report } = view;
    const names = exp.variants.map((v) => v.name);
    parts.head.replaceChildren(
      h("h1", {}, exp.name, " ", h("span", { class: `badge e-${exp.status}`, "data-testid": "experiment-status" }, exp.status)),
      h("p", { class: "muted" }, exp.paired ? "paired: every input under every variant" : `unit ${exp.unit_key}`,
        exp.stop_reason ? ` · ${exp.stop_reason}` : "", report.winner ? ` · winner: ${report.winner}` : "",
        report.srm ? ` · sample ratio p=${pvalue(report.srm.p_value)}${report.srm.flagged ? " (SKEWED)" : ""}` : ""));
    parts.charts.replaceChildren(
      h("figure", {}, h("figcaption", {}, "Mean reward and 95% interval"), intervalChart(report.variants)),
      h("figure", {}, h("figcaption", {}, "Mean reward as rewards came in"), trajectoryChart(view.trajectories, names), legend(names)));
    parts.sequential.replaceChildren(h("h2", {}, "Sequential test"), sequentialState(report));
    parts.table.replaceChildren(h("h2", {}, "Variants"), variantTable(report));
    const pointer = h("input", { value: "latest", size: 10, "data-testid": "promote-pointer" });
    const variant = h("select", { "data-testid": "promote-variant" },
      h("option", { value: "" }, report.winner ? `the winner (${report.winner})` : "the winner (none yet)"),
      names.map((n) => h("option", { value: n }, n)));
    const running = exp.status === "running";
    parts.actions.replaceChildren(h("h2", {}, "Conclude"), h("div", { class: "toolbar" },
      "promote ", variant, " to pointer ", pointer,
      h("button", { disabled: exp.concluded, "data-testid": "promote", onclick: () => act(() => api(`${path}/promote`,
        { method: "POST", body: { variant: variant.value || null, pointer: pointer.value } }), load) }, "Promote"),
      h("button", { disabled: !running, "data-testid": "stop", onclick: () => act(() => api(`${path}/stop`,
        { method: "POST", body: { reason: "stopped from the dashboard" } }), load) }, "Stop")));
  }

  async function load() { render(await api(path)); }
  await load();
  const later = throttle(() => load().catch(() => {}), 500);
  return { element, onEvent: (kind) => { if (kind === "rollouts" || kind === "registry" || kind === "resync") later(); } };
}
