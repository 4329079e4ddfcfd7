// The dashboard: a hash router over the views, the header's counts, and the live change stream.
import { api, h, showError, throttle } from "./lib.js";
import { snapshotList, snapshotDetail } from "./snapshots.js";
import { pointerTimeline } from "./pointers.js";
import { experimentList, experimentPage } from "./experiments.js";
import { rolloutList, rolloutDetail } from "./rollouts.js";
import { workerFleet } from "./workers.js";

const ROUTES = [
  [/^#\/snapshots\/(.+)$/, snapshotDetail, "snapshots"],
  [/^#\/snapshots$/, snapshotList, "snapshots"],
  [/^#\/pointers$/, pointerTimeline, "pointers"],
  [/^#\/experiments\/(.+)$/, experimentPage, "experiments"],
  [/^#\/experiments$/, experimentList, "experiments"],
  [/^#\/rollouts\/(.+)$/, rolloutDetail, "rollouts"],
  [/^#\/rollouts$/, rolloutList, "rollouts"],
  [/^#\/workers$/, workerFleet, "workers"],
];

// The view on screen: render(main) draws it; onEvent(kind, data) is told of changes.
let current = null;
let generation = 0;

async function route() {
  const hash = location.hash || "#/snapshots";
  const [pattern, view, nav] = ROUTES.find(([re]) => re.test(hash)) || ROUTES[1];
  const args = (hash.match(pattern) || []).slice(1).map(decodeURIComponent);
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
  const main = document.getElementById("view");
  const mine = ++generation;
  showError(null);
  try {
    const made = await view(...args);
    if (mine !== generation) return;  // the user moved on meanwhile
    current = made;
    main.replaceChildren(made.element);
  } catch (error) {
    if (mine !== generation) return;
    current = null;
    main.replaceChildren(h("p", { class: "muted" }, "Nothing to show."));
    showError(error);
  }
}

async function refreshCounts() {
  try {
    const o = await api("/overview");
    const counts = document.getElementById("counts");
    const shown = ["queuing", "running", "succeeded", "failed"].map((s) =>
      h("span", { class: `count s-${s}`, "data-status": s }, `${s} ${o.statuses[s] ?? 0}`));
    counts.replaceChildren(...shown, h("span", { class: "count" }, `workers ${o.workers}`));
  } catch (error) {
    /* the header is best effort; the view shows errors */
  }
}

const countsLater = throttle(refreshCounts, 1000);

function connect() {
  const live = document.getElementById("live");
  const stream = new EventSource("/api/v1/events");
  const dispatch = (kind) => (message) => {
    const data = message.data ? JSON.parse(message.data) : null;
    if (kind === "rollouts" || kind === "resync") countsLater();
    if (current && current.onEvent) current.onEvent(kind, data);
  };
  stream.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  stream.addEventListener("error", () => { live.textContent = "reconnecting"; live.className = "live off"; });
  stream.addEventListener("offline", () => { live.textContent = "Redis offline"; live.className = "live off"; });
  for (const kind of ["rollouts", "registry", "resync"]) stream.addEventListener(kind, dispatch(kind));
}

window.addEventListener("hashchange", route);
route();
refreshCounts();
connect();
