// Snapshots: the list, and one snapshot's versions, resources and diff.
import { api, h, link, query, when, json, showError } from "./lib.js";

export async function snapshotList() {
  const element = h("section", {}, h("h1", {}, "Snapshots"));
  const body = h("tbody");
  const table = h("table", { "data-testid": "snapshot-table" },
    h("thead", {}, h("tr", {}, ["resources_id", "version", "updated", "resources", "pointers"].map((c) => h("th", {}, c)))),
    body);
  const total = h("p", { class: "muted" });
  element.append(total, table);
  async function load() {
    const page = await api(`/snapshots${query({ limit: 200 })}`);
    total.textContent = `${page.total} snapshot(s), newest write first`;
    body.replaceChildren(...page.items.map((s) => h("tr", { "data-id": s.resources_id },
      h("td", {}, link(`#/snapshots/${encodeURIComponent(s.resources_id)}`, s.resources_id)),
      h("td", {}, `v${s.version}`),
      h("td", {}, when(s.update_time)),
      h("td", {}, Object.entries(s.resource_types).map(([n, t]) => h("span", { class: "chip" }, `${n}: ${t}`))),
      h("td", {}, s.pointers.map((p) => h("span", { class: "chip pointer" }, p))))));
  }
  await load();
  return { element, onEvent: (kind) => { if (kind === "registry" || kind === "resync") load(); } };
}

function renderDiff(diff) {
  const title = `${diff.left.resources_id} v${diff.left.version} → ${diff.right.resources_id} v${diff.right.version}`;
  const box = h("div", { class: "diff", "data-testid": "diff" }, h("h3", {}, title));
  if (!diff.changes.length) box.append(h("p", { class: "muted" }, "No difference."));
  for (const c of diff.changes) {
    const row = h("div", { class: `change ${c.kind}`, "data-path": c.path },
      h("code", { class: "path" }, c.path), h("span", { class: "kind" }, c.secret ? `${c.kind} (secret)` : c.kind));
    if (c.segments) {
      row.append(h("div", { class: "words" }, c.segments.map((s) =>
        s.op === "equal" ? s.text : h(s.op === "delete" ? "del" : "ins", {}, s.text))));
    } else {
      if (c.kind !== "added") row.append(h("div", {}, h("del", {}, JSON.stringify(c.old))));
      if (c.kind !== "removed") row.append(h("div", {}, h("ins", {}, JSON.stringify(c.new))));
    }
    box.append(row);
  }
  return box;
}

export async function snapshotDetail(id) {
  const [snapshot, versions, all] = await Promise.all([
    api(`/snapshots/${encodeURIComponent(id)}`),
    api(`/snapshots/${encodeURIComponent(id)}/versions`),
    api(`/snapshots${query({ limit: 200 })}`),
  ]);
  const rid = snapshot.resources_id;
  const numbers = versions.versions.map((v) => v.version);
  const option = (n, selected) => h("option", { value: n, selected: n === selected }, `v${n}`);
  const fromSelect = h("select", { "data-testid": "diff-from" }, numbers.map((n) => option(n, Math.max(1, versions.current - 1))));
  const toSelect = h("select", { "data-testid": "diff-to" }, numbers.map((n) => option(n, versions.current)));
  const against = h("select", { "data-testid": "diff-against" }, h("option", { value: "" }, "(this snapshot)"),
    all.items.filter((s) => s.resources_id !== rid).map((s) => h("option", { value: s.resources_id }, s.resources_id)));
  const diffBox = h("div");
  async function showDiff() {
    const params = against.value
      ? { from_version: fromSelect.value, against: against.value }
      : { from_version: fromSelect.value, to_version: toSelect.value };
    diffBox.replaceChildren(renderDiff(await api(`/snapshots/${encodeURIComponent(rid)}/diff${query(params)}`)));
  }
  const resources = h("div", { "data-testid": "resources" }, json(snapshot.resources));
  const element = h("section", {},
    h("p", {}, link("#/snapshots", "← snapshots")),
    h("h1", {}, rid, " ", h("span", { class: "muted" }, `v${snapshot.version}`)),
    h("p", {}, snapshot.pointers.length ? ["named by ", snapshot.pointers.map((p) => h("span", { class: "chip pointer" }, p))] : "no pointer names it",
      " · updated ", when(snapshot.update_time)),
    h("h2", {}, "Versions"),
    h("table", { "data-testid": "versions" }, h("tbody", {}, versions.versions.map((v) =>
      h("tr", {}, h("td", {}, `v${v.version}`), h("td", {}, when(v.update_time)), h("td", {}, v.size ? `${v.size} bytes` : ""),
        h("td", {}, v.author || ""), h("td", {}, (v.tags || []).join(", ")), h("td", {}, v.message || ""))))),
    h("h2", {}, "Diff"),
    h("div", { class: "toolbar" }, "from ", fromSelect, " to ", toSelect, " or against ", against,
      h("button", { onclick: () => showDiff().catch(showError), "data-testid": "diff-button" }, "Compare")),
    diffBox,
    h("h2", {}, "Resources (current version)"), resources);
  if (numbers.length > 1) await showDiff();
  return { element, onEvent: () => {} };
}
