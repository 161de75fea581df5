// The list views and forms: outcomes, dead letters, webhooks, models, submit.
import { VIEW_MS, api, h, table, cell, section, taskLink, age, when, notice, button, act, TERMINAL } from "./core.js";

// ---------------------------------------------------------------- outcomes

function filterForm(fields, onchange) {
  const form = h("form", { class: "filters", onsubmit: (e) => e.preventDefault() });
  for (const f of fields) {
    const input = f.choices
      ? h("select", { name: f.name, "aria-label": f.label }, h("option", { value: "" }, "any " + f.label), f.choices.map((c) => h("option", { value: c }, c)))
      : h("input", { name: f.name, placeholder: f.label, "aria-label": f.label, size: 18 });
    input.addEventListener("input", onchange);
    form.append(input);
  }
  return form;
}

function query(form, extra) {
  const q = new URLSearchParams(extra || {});
  for (const el of form.elements) if (el.name && el.value) q.set(el.name, el.value);
  return q.toString();
}

export function outcomesView(root) {
  const box = h("div");
  const form = filterForm([{ name: "state", label: "state", choices: TERMINAL }, { name: "model", label: "model" },
    { name: "task_id", label: "task id" }], () => view.refresh());
  root.append(section("Recent outcomes", form, box));
  const view = {
    every: VIEW_MS,
    async refresh() {
      const found = await api("/v1/results?" + query(form, { count: 100 }));
      box.replaceChildren(table("outcomes", [
        { title: "finished" }, { title: "task" }, { title: "state" }, { title: "model" }, { title: "finish" },
        { title: "tokens out", num: true }, { title: "queued", num: true }, { title: "ran", num: true },
        { title: "worker" }, { title: "error" },
      ], found.results.map((r) => h("tr", { dataset: { task: r.task_id, state: r.state } },
        cell("finished", when(r.finished_at)), h("td", {}, taskLink(r.task_id)),
        cell("state", h("span", { class: "state " + r.state }, r.state)), cell("model", r.model),
        cell("finish", r.finish_reason), cell("tokens", r.usage ? r.usage.output_tokens ?? "?" : null, true),
        cell("queued", age(r.queued_ms), true), cell("run", age(r.run_ms), true), cell("worker", r.worker),
        cell("error", r.error ? r.error.code + ": " + r.error.message : null))), "no outcome matches"));
      return found.length + " outcomes kept";
    },
  };
  return view;
}

// ---------------------------------------------------------------- dead letters

export function deadView(root) {
  const box = h("div");
  const out = h("p", { class: "notice", id: "dead-notice" });
  const reasons = ["invalid_event", "model_not_found", "idempotency_conflict", "auth", "max_attempts", "internal"];
  const form = filterForm([{ name: "reason", label: "reason", choices: reasons }, { name: "model", label: "model" },
    { name: "task_id", label: "task id" }], () => view.refresh());
  const selection = () => {
    const s = {};
    for (const el of form.elements) if (el.name && el.value) s[el.name] = el.value;
    return Object.keys(s).length ? s : { all: true };
  };
  const requeueAll = button("Requeue all shown", () => act(requeueAll, out, async () => {
    const r = await api("/v1/dead/requeue", { method: "POST", body: selection() });
    await view.refresh();
    return `${r.requeued.length} requeued` + (r.failed.length ? `, ${r.failed.length} not: ${r.failed[0].message}` : "");
  }), { id: "requeue-all" });
  const purgeAll = button("Purge all shown", () => {
    if (!window.confirm("Delete every dead letter shown? This cannot be undone.")) return;
    act(purgeAll, out, async () => {
      const r = await api("/v1/dead/purge", { method: "POST", body: selection() });
      await view.refresh();
      return `${r.purged} purged`;
    });
  }, { id: "purge-all", class: "danger" });
  root.append(section("Dead letters", h("div", { class: "toolbar" }, form, requeueAll, purgeAll), out, box));
  const one = (path, id, done) => async () => {
    const r = await api(path, { method: "POST", body: { ids: [id] }, accept: [404] });
    await view.refresh();
    return r.error ? r.message : done(r);
  };
  const view = {
    every: VIEW_MS,
    async refresh() {
      const found = await api("/v1/dead?" + query(form, { count: 200 }));
      box.replaceChildren(table("dead", [
        { title: "dead since" }, { title: "task" }, { title: "reason" }, { title: "model" },
        { title: "attempts", num: true }, { title: "message" }, { title: "" },
      ], found.letters.map((d) => {
        const requeue = button("Requeue", () => act(requeue, out, one("/v1/dead/requeue", d.id,
          (r) => r.requeued.length ? `requeued ${d.task_id} as ${r.requeued[0].entry_id}` : `not requeued: ${r.failed[0].message}`)),
          { class: "requeue" });
        const purge = button("Purge", () => {
          if (window.confirm("Delete this dead letter?")) act(purge, out, one("/v1/dead/purge", d.id, (r) => `${r.purged} purged`));
        }, { class: "purge danger" });
        return h("tr", { dataset: { id: d.id, task: d.task_id || "" } },
          cell("dead_at", when(d.dead_at)), h("td", {}, d.task_id ? taskLink(d.task_id) : "–"), cell("reason", d.reason),
          cell("model", d.model), cell("attempts", d.attempts, true), cell("message", d.message), h("td", { class: "actions" }, requeue, purge));
      }), "no dead letter"));
      return found.length + " dead letters" + (found.unreadable ? `, ${found.unreadable} unreadable` : "");
    },
  };
  return view;
}

// ---------------------------------------------------------------- webhooks

export function redeliver(taskId, force) {
  return api(`/v1/webhooks/${encodeURIComponent(taskId)}/redeliver${force ? "?force=true" : ""}`, { method: "POST" })
    .then((r) => `redelivery ${r.delivery_id} queued (${r.from_dead ? "from the dead letters" : "again"})`);
}

export function webhooksView(root) {
  const box = h("div");
  const out = h("p", { class: "notice", id: "webhook-notice" });
  const input = h("input", { placeholder: "task id", "aria-label": "task id", id: "redeliver-task" });
  const force = h("input", { type: "checkbox", id: "redeliver-force" });
  const send = button("Redeliver", () => act(send, out, () => redeliver(input.value.trim(), force.checked)), { id: "redeliver" });
  root.append(section("Webhook deliveries", h("div", { class: "toolbar" }, input, h("label", {}, force, " even while under way"), send), out,
    h("h3", {}, "Dead deliveries"), box));
  return {
    every: VIEW_MS,
    async refresh() {
      const found = await api("/v1/webhooks/dead?count=200");
      box.replaceChildren(table("webhooks-dead", [
        { title: "dead since" }, { title: "task" }, { title: "url" }, { title: "reason" }, { title: "attempts", num: true },
        { title: "last attempt" }, { title: "" },
      ], found.letters.map((d) => {
        if (!d.readable) return h("tr", {}, h("td", { colspan: 7, class: "error" }, "entry " + d.id + " does not parse"));
        const again = d.task_id ? button("Redeliver", () => act(again, out, () => redeliver(d.task_id, false)), { class: "redeliver" }) : "";
        const last = d.last_attempt;
        return h("tr", { dataset: { id: d.id, task: d.task_id || "" } },
          cell("dead_at", when(d.dead_at)), h("td", {}, d.task_id ? taskLink(d.task_id) : "–"), cell("url", d.url),
          cell("reason", d.reason), cell("attempts", d.attempts, true),
          cell("last", last ? (last.status !== null ? "HTTP " + last.status : last.error) + " at " + when(last.at) : null),
          h("td", { class: "actions" }, again));
      }), "no dead delivery"));
      return found.length + " dead deliveries";
    },
  };
}

// ---------------------------------------------------------------- models

const SPEC_EXAMPLE = JSON.stringify({ name: "qwen-7b", provider: "openai_compatible", model_id: "qwen2.5-7b-instruct",
  base_url: "http://127.0.0.1:8000/v1", concurrency: 4 }, null, 2);

export function modelsView(root) {
  const box = h("div");
  const out = h("p", { class: "notice", id: "models-notice" });
  const spec = h("textarea", { rows: 8, cols: 60, id: "model-spec", "aria-label": "model spec", spellcheck: "false" });
  spec.value = SPEC_EXAMPLE;
  const register = button("Register", () => act(register, out, async () => {
    let body;
    try { body = JSON.parse(spec.value); } catch (err) { throw new Error("the spec is not JSON: " + err.message); }
    const r = await api("/v1/models", { method: "POST", body });
    await view.refresh();
    return `${r.name} registered (store version ${r.version}); workers of its pool load it`;
  }), { id: "register-model" });
  root.append(section("Models", box, out), section("Register a model", h("p", { class: "muted" },
    "A model spec as JSON (the fields of sop-llm models add; see docs/providers.md)."), spec, h("div", {}, register)));
  const view = {
    every: 2000,
    async refresh() {
      const m = await api("/v1/models");
      const served = (name) => (m.served[name] || []).join(", ") || "no live worker";
      const rows = m.builtin.map((name) => h("tr", { dataset: { model: name } },
        cell("name", name), cell("provider", "built in"), cell("model_id", null), cell("pool", "every pool"),
        cell("served", served(name)), h("td")));
      for (const s of m.specs) {
        const remove = button("Remove", () => {
          if (window.confirm(`Forget model ${s.name}?`)) {
            act(remove, out, async () => {
              await api("/v1/models/" + s.name.split("/").map(encodeURIComponent).join("/"), { method: "DELETE" });
              await view.refresh();
              return s.name + " removed";
            });
          }
        }, { class: "danger remove" });
        rows.push(h("tr", { dataset: { model: s.name } }, cell("name", s.name), cell("provider", s.provider),
          cell("model_id", s.model_id || s.path), cell("pool", s.pool), cell("served", served(s.name)), h("td", { class: "actions" }, remove)));
      }
      for (const [name, why] of Object.entries(m.invalid)) {
        rows.push(h("tr", { class: "error" }, cell("name", name), h("td", { colspan: 5 }, "invalid: " + why)));
      }
      box.replaceChildren(table("models", [{ title: "model" }, { title: "provider" }, { title: "backend id / file" },
        { title: "pool" }, { title: "served by" }, { title: "" }], rows));
      return "model store version " + m.version;
    },
  };
  return view;
}

// ---------------------------------------------------------------- submit

export function submitView(root) {
  const out = h("p", { class: "notice", id: "submit-notice" });
  const field = (label, el) => h("label", {}, h("span", {}, label), el);
  const model = h("input", { name: "model", value: "echo", required: true });
  const prompt = h("textarea", { name: "prompt", rows: 5, cols: 60, required: true });
  const priority = h("select", { name: "priority" });
  const maxTokens = h("input", { name: "max_tokens", type: "number", min: 1, value: 16 });
  const stream = h("input", { name: "stream", type: "checkbox", checked: true });
  const key = h("input", { name: "idempotency_key", placeholder: "optional" });
  const form = h("form", { class: "stack", id: "submit-form" }, field("model", model), field("prompt", prompt),
    field("priority", priority), field("max tokens", maxTokens), field("stream tokens", stream),
    field("idempotency key", key), h("div", {}, h("button", { type: "submit", id: "submit-task" }, "Submit")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const btn = document.getElementById("submit-task");
    act(btn, out, async () => {
      const body = { model: model.value.trim(), prompt: prompt.value, stream: stream.checked };
      if (priority.value) body.priority = priority.value;
      if (maxTokens.value) body.max_tokens = Number(maxTokens.value);
      if (key.value) body.idempotency_key = key.value;
      const r = await api("/v1/tasks", { method: "POST", body });
      location.hash = "#/task/" + encodeURIComponent(r.task_id);
      return "submitted " + r.task_id;
    });
  });
  root.append(section("Submit a task", form, out));
  api("/v1/queue").then((q) => {
    const names = [...new Set(q.partitions.map((p) => p.partition))];
    priority.replaceChildren(...names.map((n) => h("option", { value: n, selected: n === names[Math.floor(names.length / 2)] }, n)));
  }).catch(() => {});
  return null;
}
