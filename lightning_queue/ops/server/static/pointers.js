// Pointers: where each points, how it moved (newest first), and buttons to move or roll it back.
import { act, api, h, link, query, when } from "./lib.js";

export async function pointerTimeline() {
  const element = h("section", {}, h("h1", {}, "Pointers"));
  const list = h("div", { class: "pointers" });
  element.append(list);
  // The target picked in a card's list and not moved to yet: a live reload redraws the cards, and
  // must not put the list back to the pointer's target under the user (a Move then sent the old one).
  const picked = new Map();

  async function load() {
    const [pointers, snapshots] = await Promise.all([api("/pointers"), api(`/snapshots${query({ limit: 200 })}`)]);
    const histories = await Promise.all(pointers.map((p) => api(`/pointers/${encodeURIComponent(p.name)}/history${query({ limit: 20 })}`)));
    list.replaceChildren(...pointers.map((p, i) => card(p, histories[i], snapshots.items)));
    if (!pointers.length) list.append(h("p", { class: "muted" }, "No pointer yet."));
  }

  function card(pointer, moves, snapshots) {
    const shown = picked.get(pointer.name) ?? pointer.target;
    const target = h("select", { "data-testid": `move-target-${pointer.name}`,
      onchange: () => picked.set(pointer.name, target.value) },
      snapshots.map((s) => h("option", { value: s.resources_id, selected: s.resources_id === shown }, s.resources_id)));
    const done = () => { picked.delete(pointer.name); load(); };
    const move = () => act(() => api(`/pointers/${encodeURIComponent(pointer.name)}`,
      { method: "PUT", body: { target: target.value, expected: pointer.target } }), done);
    const rollback = () => act(() => api(`/pointers/${encodeURIComponent(pointer.name)}/rollback`, { method: "POST" }), done);
    return h("div", { class: "card", "data-pointer": pointer.name, "data-target": pointer.target || "" },
      h("h2", {}, pointer.name, " → ",
        pointer.target ? link(`#/snapshots/${encodeURIComponent(pointer.target)}`, pointer.target, { "data-testid": `target-${pointer.name}` }) : "(unset)"),
      h("div", { class: "toolbar" },
        h("button", { onclick: rollback, disabled: moves.length < 1, "data-testid": `rollback-${pointer.name}` }, "Roll back"),
        " or move to ", target, h("button", { onclick: move, "data-testid": `move-${pointer.name}` }, "Move")),
      h("ol", { class: "timeline", "data-testid": `timeline-${pointer.name}` }, moves.map((m) =>
        h("li", {}, h("time", {}, when(m.time)), " ", h("code", {}, m.from_id || "(unset)"), " → ",
          h("code", {}, m.to_id || "(unset)"), " ", h("span", { class: "muted" },
            `by ${m.by}` + (m.op ? ` (${m.op})` : "") + (m.reason ? `: ${m.reason}` : ""))))));
  }

  await load();
  return { element, onEvent: (kind) => { if (kind === "registry" || kind === "resync") load(); } };
}
