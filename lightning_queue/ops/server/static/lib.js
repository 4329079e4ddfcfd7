// Small helpers shared by the views: DOM building (never innerHTML: ids, inputs and outputs are
// user data), the API client, formatting.

export function h(tag, attrs = {}, ...children) {
  const svg = ["svg", "g", "line", "rect", "circle", "path", "polyline", "polygon", "text", "title"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.setAttribute("class", value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail))
      : `HTTP ${status}`);
    this.status = status;
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(`/api/v1${path}`, init);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) search.append(key, item);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

export function when(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const d = new Date(seconds * 1000);
  return d.toLocaleString(undefined, { hour12: false });
}

export function ago(seconds) {
  if (!seconds) return "never";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

export function num(value, digits = 3) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

export function pct(value) {
  return value === null || value === undefined ? "–" : `${(100 * value).toFixed(1)}%`;
}

export function pvalue(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1e-4 ? value.toFixed(4) : value.toExponential(1);
}

export function link(href, text, attrs = {}) {
  return h("a", { href, ...attrs }, text);
}

export function statusBadge(status) {
  return h("span", { class: `badge s-${status}` }, status);
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

// Calls fn at most once per `ms`, the last call winning (live refreshes under a burst of events).
export function throttle(fn, ms) {
  let timer = null;
  let pending = false;
  return () => {
    if (timer) { pending = true; return; }
    fn();
    timer = setTimeout(function fire() {
      timer = null;
      if (pending) { pending = false; fn(); timer = setTimeout(fire, ms); }
    }, ms);
  };
}

export function showError(error) {
  const banner = document.getElementById("banner");
  banner.textContent = error ? String(error.message || error) : "";
  banner.classList.toggle("hidden", !error);
}

// Runs a change the user asked for; shows its error, or says what it did.
export async function act(what, done) {
  try {
    const result = await what();
    showError(null);
    if (done) done(result);
    return result;
  } catch (error) {
    showError(error);
    return null;
  }
}
