// Workers: each one's health (stalled or not) and each process's snapshot cache.
import { api, ago, h, pct, throttle } from "./lib.js";

export async function workerFleet() {
  const element = h("section", {}, h("h1", {}, "Workers"));
  const body = h("div");
  element.append(body);
  async function load() {
    const fleet = await api("/workers");
    body.replaceChildren(
      fleet.stalled.length ? h("p", { class: "error" }, `${fleet.stalled.length} stalled: ${fleet.stalled.join(", ")}`) : "",
      h("table", { "data-testid": "worker-table" }, h("thead", {}, h("tr", {},
        ["worker", "pid", "busy", "queues", "waiting", "last received", "health"].map((c) => h("th", {}, c)))),
        h("tbody", {}, fleet.workers.map((w) => h("tr", { "data-worker": w.hostname },
          h("td", {}, w.hostname), h("td", {}, w.pid), h("td", {}, `${w.active}/${w.concurrency}`),
          h("td", {}, w.consuming.join(", ")), h("td", {}, Object.values(w.queued).reduce((a, b) => a + b, 0)),
          h("td", {}, ago(w.last_received)),
          h("td", {}, w.stalled ? h("span", { class: "badge s-failed", title: w.reason }, "stalled") : h("span", { class: "badge s-succeeded" }, "ok")))))),
      fleet.workers.length ? "" : h("p", { class: "muted" }, "No live worker (a worker reports itself every few seconds)."),
      h("h2", {}, "Snapshot caches"),
      h("table", {}, h("thead", {}, h("tr", {}, ["process", "hit ratio", "hits", "misses", "entries", "bytes"].map((c) => h("th", {}, c)))),
        h("tbody", {}, Object.entries(fleet.caches).map(([name, c]) => h("tr", {}, h("td", {}, name), h("td", {}, pct(c.hit_ratio)),
          h("td", {}, c.hits), h("td", {}, c.misses), h("td", {}, c.entries), h("td", {}, c.bytes))))));
  }
  await load();
  const later = throttle(() => load().catch(() => {}), 2000);
  // Health records are rewritten by each worker's timer, not announced: re-read them now and then too.
  const timer = setInterval(() => { if (element.isConnected) later(); else clearInterval(timer); }, 5000);
  return { element, onEvent: () => later() };
}
