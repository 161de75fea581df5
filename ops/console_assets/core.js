// The console's core: API calls with the token, server-sent events read through fetch, and a
// few helpers that build the page. Text from Redis is always set as text, never as HTML.

const TOKEN_KEY = "sop-llm-token";
export const OVERVIEW_MS = 500;
export const VIEW_MS = 1000;
export const RATE_WINDOW_MS = 10000;

// ---------------------------------------------------------------- the API and its token

let token = sessionStorage.getItem(TOKEN_KEY);
let asking = null; // the pending token prompt, shared by every request that met a 401

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : "HTTP " + status);
    this.status = status;
    this.body = body;
  }
}

function askToken(refused) {
  if (asking) return asking;
  const dialog = document.getElementById("login");
  const input = document.getElementById("token");
  document.getElementById("login-refused").hidden = !refused;
  input.value = "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", function done() {
      dialog.removeEventListener("close", done);
      token = input.value;
      sessionStorage.setItem(TOKEN_KEY, token);
      asking = null;
      resolve();
    });
  });
  dialog.showModal();
  return asking;
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

// One API call; a 401 asks for the token (again) and retries. Answers the parsed JSON body;
// throws ApiError for any other status outside 2xx.
export async function api(path, { method = "GET", body, accept = [] } = {}) {
  for (;;) {
    const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const res = await fetch(path, init);
    if (res.status === 401) {
      await askToken(Boolean(token));
      continue;
    }
    const type = res.headers.get("Content-Type") || "";
    const data = type.startsWith("application/json") ? await res.json() : null;
    if (!res.ok && !accept.includes(res.status)) throw new ApiError(res.status, data);
    return data;
  }
}

// Server-sent events read through fetch (EventSource cannot send the token): calls
// onEvent(name, data) for each event until the stream ends.
export async function events(path, onEvent, signal) {
  for (;;) {
    const res = await fetch(path, { headers: headers(), signal });
    if (res.status === 401) {
      await askToken(Boolean(token));
      continue;
    }
    if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(name, JSON.parse(data.join("\n")));
      }
    }
  }
}

// ---------------------------------------------------------------- building the page

// h("td", {class: "num", dataset: {field: "length"}}, "12"): an element; strings become text
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function table(id, columns, rows, empty) {
  return h("table", { id },
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : null }, c.title)))),
    h("tbody", {}, rows.length ? rows : h("tr", { class: "empty" }, h("td", { colspan: columns.length }, empty || "none"))));
}

export function cell(field, value, num) {
  return h("td", { dataset: { field }, class: num ? "num" : null }, value === null || value === undefined ? "–" : value);
}

export function section(title, ...content) {
  return h("section", {}, h("h2", {}, title), ...content);
}

export function taskLink(id) {
  return h("a", { href: "#/task/" + encodeURIComponent(id), class: "task" }, id);
}

export function age(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1000) return ms + "ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
  const hours = Math.floor(m / 60);
  return hours < 24 ? hours + "h" + String(m % 60).padStart(2, "0") + "m" : Math.floor(hours / 24) + "d" + (hours % 24) + "h";
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

export function when(ms) {
  return ms ? new Date(ms).toLocaleTimeString() : "–";
}

export function setStatus(text, bad) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.classList.toggle("bad", Boolean(bad));
}

export function notice(el, text, bad) {
  el.textContent = text;
  el.className = bad ? "notice error" : "notice ok";
}

export function button(label, onclick, attrs) {
  return h("button", Object.assign({ type: "button", onclick }, attrs || {}), label);
}

// Run an action from a button: the button is disabled meanwhile, the outcome shown in `out`.
export async function act(btn, out, run) {
  btn.disabled = true;
  try {
    const text = await run();
    if (out) notice(out, text, false);
  } catch (err) {
    if (out) notice(out, err.message, true);
  } finally {
    btn.disabled = false;
  }
}

export const TERMINAL = ["completed", "failed", "cancelled", "expired"];
