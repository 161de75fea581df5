// One task: its status record, live tokens, attempts, dead letters and webhook.
import { VIEW_MS, api, events, h, table, cell, section, age, when, notice, button, act, TERMINAL } from "./core.js";
import { redeliver } from "./views.js";

export function taskView(root, taskId) {
  const out = h("p", { class: "notice", id: "task-notice" });
  const head = h("div", { class: "task-head" });
  const details = h("div");
  const tokens = h("pre", { id: "tokens", class: "tokens" });
  const streamState = h("p", { class: "muted", id: "stream-state" }, "waiting for tokens…");
  const history = h("div");
  root.append(section("Task " + taskId, head, out, details),
    section("Output", streamState, tokens), section("Attempts, dead letters and webhook", history));
  const abort = new AbortController();
  events(`/v1/tasks/${encodeURIComponent(taskId)}/stream`, (name, data) => {
    if (name === "delta") {
      tokens.append(data.text);
      streamState.textContent = "streaming…";
    } else if (name === "end") {
      streamState.textContent = "ended: " + data.state + (data.finish_reason ? " (" + data.finish_reason + ")" : "");
      tokens.dataset.ended = data.state;
    }
  }, abort.signal).catch((err) => {
    if (err.name !== "AbortError") streamState.textContent = "no token stream: " + err.message;
  });
  return {
    every: VIEW_MS,
    stop() { abort.abort(); },
    async refresh() {
      const path = "/v1/tasks/" + encodeURIComponent(taskId);
      const [s, hist] = await Promise.all([api(path, { accept: [404] }), api(path + "/history", { accept: [404] })]);
      if (s.error) {
        head.replaceChildren(h("p", { class: "error" }, "No such task (never seen, or its record expired)."));
        return "task not found";
      }
      const r = s.result || {};
      const buttons = [];
      if (!TERMINAL.includes(s.state)) {
        const cancel = button("Cancel", () => act(cancel, out, async () => {
          const c = await api(path, { method: "DELETE", accept: [409] });
          return { cancelled: "cancelled", requested: "asked to stop between tokens", finished: "already finished" }[c.outcome];
        }), { id: "cancel-task", class: "danger" });
        buttons.push(cancel);
      }
      if (s.webhook) {
        const again = button("Redeliver webhook", () => act(again, out, () => redeliver(taskId, false)), { id: "redeliver-task" });
        buttons.push(again);
      }
      head.replaceChildren(h("span", { class: "state " + s.state, id: "task-state" }, s.state), ...buttons);
      const row = (k, v) => (v === null || v === undefined || v === "" ? null : h("tr", {}, h("th", {}, k), h("td", { dataset: { field: k } }, v)));
      details.replaceChildren(h("table", { class: "kv", id: "task-details" }, h("tbody", {},
        row("model", s.model), row("stream", s.stream), row("entry", s.entry_id), row("worker", s.worker || r.worker),
        row("attempts", String(s.attempts)), row("created", when(s.created_at)), row("started", when(s.started_at)),
        row("finished", when(s.finished_at)), row("queued for", r.queued_ms !== undefined ? age(r.queued_ms) : null),
        row("ran for", r.run_ms !== undefined ? age(r.run_ms) : null), row("finish reason", r.finish_reason),
        row("tokens", r.usage ? `${r.usage.input_tokens ?? "?"} in, ${r.usage.output_tokens ?? "?"} out` : null),
        row("error", r.error ? r.error.code + ": " + r.error.message : null), row("duplicate of", s.duplicate_of),
        row("webhook", s.webhook ? `${s.webhook.state}, ${s.webhook.attempts} attempt(s)` +
          (s.webhook.last_status_code ? ", last HTTP " + s.webhook.last_status_code : "") +
          (s.webhook.last_error ? ", last error " + s.webhook.last_error : "") : null))));
      const parts = [];
      if (!hist.error) {
        parts.push(h("h3", {}, "Errors of earlier attempts"), hist.errors.length
          ? h("ol", { id: "attempt-errors" }, hist.errors.map((e) => h("li", {}, e.code + ": " + e.message)))
          : h("p", { class: "muted" }, "none"));
        parts.push(h("h3", {}, "Dead letters"), table("task-dead", [{ title: "dead since" }, { title: "reason" }, { title: "message" }, { title: "" }],
          hist.dead_letters.map((d) => {
            const requeue = button("Requeue", () => act(requeue, out, async () => {
              const q = await api("/v1/dead/requeue", { method: "POST", body: { ids: [d.id] }, accept: [404] });
              return q.requeued && q.requeued.length ? "requeued" : q.message || q.failed[0].message;
            }), { class: "requeue" });
            return h("tr", { dataset: { id: d.id } }, cell("dead_at", when(d.dead_at)), cell("reason", d.reason), cell("message", d.message), h("td", {}, requeue));
          })));
        parts.push(h("h3", {}, "Dead webhook deliveries"), table("task-webhooks-dead", [{ title: "dead since" }, { title: "url" }, { title: "reason" }, { title: "attempts", num: true }],
          hist.webhook_dead_letters.map((d) => h("tr", {}, cell("dead_at", when(d.dead_at)), cell("url", d.url), cell("reason", d.reason), cell("attempts", d.attempts, true)))));
      }
      history.replaceChildren(...parts);
      return "task " + s.state;
    },
  };
}
