// The sop-llm operator console: one page, no framework, no build step. Every figure comes from
// the sidecar's HTTP API (GET /v1/overview, /v1/inflight, /v1/gpu, ...) and every action is one
// API call; the current view polls it (the overview every 500 ms).

import { setStatus } from "./core.js";
import { overviewView } from "./overview.js";
import { taskView } from "./task.js";
import { deadView, modelsView, outcomesView, submitView, webhooksView } from "./views.js";

// ---------------------------------------------------------------- the router and the poll loop

const VIEWS = { "": overviewView, outcomes: outcomesView, dead: deadView, webhooks: webhooksView, models: modelsView, submit: submitView };
let current = null;

function route() {
  if (current) {
    current.alive = false;
    if (current.view && current.view.stop) current.view.stop();
  }
  const hash = location.hash.replace(/^#\/?/, "");
  const root = document.getElementById("view");
  root.replaceChildren();
  let view;
  let name = hash;
  if (hash.startsWith("task/")) {
    name = "task";
    view = taskView(root, decodeURIComponent(hash.slice(5)));
  } else {
    view = (VIEWS[hash] || overviewView)(root);
  }
  for (const a of document.querySelectorAll("nav a[data-view]")) {
    a.classList.toggle("active", (a.dataset.view === "overview" ? "" : a.dataset.view) === name);
  }
  const me = { alive: true, view };
  current = me;
  if (view) poll(me);
}

async function poll(me) {
  while (me.alive) {
    const started = Date.now();
    try {
      const said = await me.view.refresh();
      if (!me.alive) return;
      setStatus(said + " · updated " + new Date().toLocaleTimeString(), false);
      document.body.dataset.updated = String(Date.now());
    } catch (err) {
      if (!me.alive) return;
      setStatus("error: " + err.message, true);
    }
    await new Promise((resolve) => setTimeout(resolve, Math.max(50, me.view.every - (Date.now() - started))));
  }
}

window.addEventListener("hashchange", route);
route(); // a module runs once the document is parsed
