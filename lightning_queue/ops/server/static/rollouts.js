// Rollouts: a filtered list a page at a time, and one rollout with its attempts, result and trace.
import { api, h, json, link, num, query, statusBadge, throttle, when } from "./lib.js";

const STATUSES = ["queuing", "preparing", "running", "requeuing", "succeeded", "failed", "cancelled"];

function filtersFromHash() {
  const [, search = ""] = location.hash.split("?");
  return Object.fromEntries(new URLSearchParams(search));
}

export async function rolloutList() {
  const given = filtersFromHash();
  const status = h("select", { "data-testid": "filter-status" }, h("option", { value: "" }, "any status"),
    STATUSES.map((s) => h("option", { value: s, selected: given.status === s }, s)));
  const mode = h("select", {}, h("option", { value: "" }, "any mode"),
    ["train", "val", "test"].map((m) => h("option", { value: m, selected: given.mode === m }, m)));
  const experiment = h("input", { placeholder: "experiment", value: given.experiment || "", size: 12, "data-testid": "filter-experiment" });
  const snapshot = h("input", { placeholder: "snapshot id", value: given.resources_id || "", size: 14 });
  const body = h("tbody");
  const more = h("button", { "data-testid": "more" }, "More");
  let cursor = null;

  function filters() {
    return { status: status.value, mode: mode.value, experiment: experiment.value.trim(),
      resources_id: snapshot.value.trim() };
  }

  function row(r) {
    return h("tr", { "data-id": r.rollout_id },
      h("td", {}, link(`#/rollouts/${encodeURIComponent(r.rollout_id)}`, r.rollout_id)),
      h("td", {}, statusBadge(r.status)), h("td", {}, r.mode || ""),
      h("td", {}, r.resources_id ? `${r.resources_id}${r.resources_version ? ` v${r.resources_version}` : ""}` : "latest"),
      h("td", {}, r.experiment ? `${r.experiment}/${r.variant}` : ""),
      h("td", {}, num(r.reward)), h("td", {}, r.error_type || ""), h("td", {}, r.attempt_count),
      h("td", {}, when(r.enqueue_time)));
  }

  async function load(append) {
    const page = await api(`/rollouts${query({ ...filters(), cursor: append ? cursor : null, limit: 50 })}`);
    cursor = page.next_cursor;
    const rows = page.items.map(row);
    if (append) body.append(...rows); else body.replaceChildren(...rows);
    more.disabled = !cursor;
  }

  more.addEventListener("click", () => load(true));
  const apply = () => load(false);
  for (const input of [status, mode]) input.addEventListener("change", apply);
  for (const input of [experiment, snapshot]) input.addEventListener("change", apply);
  const element = h("section", {}, h("h1", {}, "Rollouts"),
    h("div", { class: "toolbar" }, status, mode, experiment, snapshot, h("button", { onclick: apply }, "Filter")),
    h("table", { "data-testid": "rollout-table" }, h("thead", {}, h("tr", {},
      ["rollout", "status", "mode", "snapshot", "experiment", "reward", "error", "attempts", "enqueued"].map((c) => h("th", {}, c)))), body),
    more);
  await load(false);
  // New rollouts show up at the top; the first page is re-read while no further page is shown.
  const later = throttle(() => { if (body.children.length <= 50) load(false).catch(() => {}); }, 1000);
  return { element, onEvent: (kind) => { if (kind === "rollouts" || kind === "resync") later(); } };
}

export async function rolloutDetail(id) {
  const element = h("section", { "data-testid": "rollout" });
  async function load() {
    const { rollout: r, attempts, trace, spans } = await api(`/rollouts/${encodeURIComponent(id)}`);
    element.replaceChildren(
      h("p", {}, link("#/rollouts", "← rollouts")),
      h("h1", {}, r.rollout_id, " ", statusBadge(r.status)),
      h("dl", { class: "facts" },
        h("dt", {}, "snapshot"), h("dd", {}, r.resources_id ? link(`#/snapshots/${encodeURIComponent(r.resources_id)}`, r.resources_id) : "latest",
          r.resources_version ? ` v${r.resources_version}` : "", ` (${r.resolve})`),
        h("dt", {}, "reward"), h("dd", { "data-testid": "reward" }, num(r.result ? r.result.reward : null)),
        h("dt", {}, "mode / queue"), h("dd", {}, `${r.mode || "–"} / ${r.queue}`),
        h("dt", {}, "enqueued"), h("dd", {}, when(r.enqueue_time)),
        h("dt", {}, "started / ended"), h("dd", {}, `${when(r.start_time) || "–"} / ${when(r.end_time) || "–"}`),
        h("dt", {}, "attempts"), h("dd", {}, `${r.attempt_count} of ${r.config.max_attempts}`),
        r.metadata.experiment ? [h("dt", {}, "experiment"), h("dd", {},
          link(`#/experiments/${encodeURIComponent(r.metadata.experiment)}`, r.metadata.experiment), ` / ${r.metadata.variant}`)] : []),
      r.error ? h("div", { class: "error" }, h("h2", {}, `Error: ${r.error.type}`), h("p", {}, r.error.message),
        r.error.traceback ? h("pre", {}, r.error.traceback) : "") : "",
      h("h2", {}, "Attempts"),
      h("table", { "data-testid": "attempts" }, h("thead", {}, h("tr", {},
        ["#", "status", "worker", "snapshot", "started", "took", "reward", "error"].map((c) => h("th", {}, c)))),
        h("tbody", {}, attempts.map((a) => h("tr", {}, h("td", {}, a.sequence_id), h("td", {}, statusBadge(a.status)),
          h("td", {}, a.worker_id), h("td", {}, a.resources_id ? `${a.resources_id} v${a.resources_version}` : ""),
          h("td", {}, when(a.start_time)), h("td", {}, a.end_time ? `${(a.end_time - a.start_time).toFixed(3)} s` : ""),
          h("td", {}, num(a.result ? a.result.reward : null)), h("td", {}, a.error ? `${a.error.type}: ${a.error.message}` : ""))))),
      h("h2", {}, "Input"), json(r.input),
      h("h2", {}, "Result"), r.result ? json({ reward: r.result.reward, step_rewards: r.result.step_rewards, output: r.result.output }) : h("p", { class: "muted" }, "none yet"),
      h("h2", {}, "Trace"), spans ? json(spans) : trace ? json(trace) : h("p", { class: "muted", "data-testid": "trace" }, "No trace recorded for this rollout."),
      Object.keys(r.metadata).length ? [h("h2", {}, "Metadata"), json(r.metadata)] : []);
  }
  await load();
  return { element, onEvent: (kind, data) => { if (kind === "resync" || (kind === "rollouts" && data.ids.includes(id))) load(); } };
}
