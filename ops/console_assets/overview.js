// The overview: queues per pool and partition (with rates), tasks in flight, workers, GPU.
import { OVERVIEW_MS, RATE_WINDOW_MS, api, h, table, cell, section, taskLink, age, bytes } from "./core.js";

const history = new Map(); // stream -> [[time, entries added, entries read]], for the rates

function rates(stream, added, read, now) {
  const seen = history.get(stream) || [];
  seen.push([now, added, read]);
  while (seen.length > 2 && now - seen[0][0] > RATE_WINDOW_MS) seen.shift();
  history.set(stream, seen);
  const [t0, a0, r0] = seen[0];
  const dt = (now - t0) / 1000;
  if (dt < 0.9) return [null, null];
  return [(added - a0) / dt, read === null || r0 === null ? null : (read - r0) / dt];
}

function perSecond(x) {
  return x === null ? "–" : x.toFixed(x < 10 ? 1 : 0) + "/s";
}

function queuesTable(partitions, now) {
  const rows = partitions.map((p) => {
    const read = p.lag === null ? null : p.entries_added - p.lag;
    const [rateIn, rateOut] = rates(p.stream, p.entries_added, read, now);
    return h("tr", { dataset: { stream: p.stream } },
      cell("pool", p.pool), cell("partition", p.partition),
      cell("length", p.length, true), cell("lag", p.lag, true), cell("pending", p.pending, true),
      cell("oldest-waiting", age(p.oldest_waiting_age_ms), true),
      cell("oldest-pending", age(p.oldest_pending_age_ms), true),
      cell("rate-in", perSecond(rateIn), true), cell("rate-out", perSecond(rateOut), true),
      cell("consumers", p.consumers, true));
  });
  return table("queues", [
    { title: "pool" }, { title: "partition" }, { title: "depth", num: true }, { title: "lag", num: true },
    { title: "pending", num: true }, { title: "oldest waiting", num: true }, { title: "oldest pending", num: true },
    { title: "in", num: true }, { title: "out", num: true }, { title: "consumers", num: true },
  ], rows);
}

function summary(o) {
  const card = (id, label, value, href) => h("a", { class: "card", id, href: href || null },
    h("span", { class: "value", dataset: { field: id } }, String(value)), h("span", { class: "label" }, label));
  return h("div", { class: "cards" },
    card("dead-count", "dead letters", o.dead.length, "#/dead"),
    card("retries-count", "retries waiting", o.retries.waiting),
    card("parked-count", "parked for their model", o.parked),
    card("webhooks-pending", "webhooks pending", o.webhooks.pending + o.webhooks.delayed, "#/webhooks"),
    card("webhooks-dead", "webhooks dead", o.webhooks.dead, "#/webhooks"),
    card("results-count", "outcomes kept", o.results.length, "#/outcomes"),
    card("workers-count", "live workers", o.workers.length));
}

function workersTable(workers) {
  return table("workers", [
    { title: "worker" }, { title: "pools" }, { title: "models" }, { title: "slots in use", num: true },
    { title: "lease left", num: true }, { title: "store version", num: true },
  ], workers.map((w) => h("tr", { dataset: { consumer: w.consumer } },
    cell("consumer", w.consumer), cell("pools", w.pools.join(", ")), cell("models", w.models.join(", ")),
    cell("held", w.held, true), cell("lease", age(w.lease_ttl_ms), true), cell("version", w.version, true))),
  "no live worker");
}

function consumersTable(consumers) {
  return table("consumers", [
    { title: "group" }, { title: "consumer" }, { title: "pending", num: true }, { title: "idle", num: true },
    { title: "lease" },
  ], consumers.map((c) => h("tr", { dataset: { consumer: c.consumer, group: c.group } },
    cell("group", c.group), cell("consumer", c.consumer), cell("pending", c.pending, true),
    cell("idle", age(c.idle_ms), true),
    cell("lease", c.lease_alive ? "alive" + (c.lease_ttl_ms !== null ? " (" + age(c.lease_ttl_ms) + ")" : "") : "expired"))));
}

function inflightTable(found) {
  const now = Date.now();
  return table("inflight", [
    { title: "task" }, { title: "state" }, { title: "model" }, { title: "partition" }, { title: "held by" },
    { title: "running for", num: true }, { title: "deliveries", num: true },
  ], found.tasks.map((t) => h("tr", { dataset: { task: t.task_id } },
    h("td", {}, taskLink(t.task_id)), cell("state", t.parked ? "waiting for its model" : t.state),
    cell("model", t.model), cell("partition", t.pool + "/" + t.partition), cell("consumer", t.parked ? "–" : t.consumer),
    cell("age", t.started_at ? age(now - t.started_at) : "–", true), cell("deliveries", t.deliveries, true))),
  "nothing in flight");
}

function gpuBox(gpu) {
  const parts = [h("p", { class: "muted", id: "gpu-status" }, gpu.status)];
  if (gpu.devices.length) {
    parts.push(table("gpu-devices", [
      { title: "device" }, { title: "name" }, { title: "VRAM used", num: true }, { title: "VRAM total", num: true },
      { title: "utilisation", num: true }, { title: "temperature", num: true },
    ], gpu.devices.map((d) => h("tr", {},
      cell("index", d.index), cell("name", d.name),
      h("td", { class: "num" }, bytes(d.used_bytes), h("meter", { min: 0, max: d.total_bytes, value: d.used_bytes })),
      cell("total", bytes(d.total_bytes), true),
      cell("util", d.utilization_pct === null ? null : d.utilization_pct + "%", true),
      cell("temp", d.temperature_c === null ? null : d.temperature_c + "°C", true)))));
  }
  for (const s of gpu.semaphores || []) {
    parts.push(h("p", {}, h("strong", {}, "semaphore " + s.device), " · " + s.holders.length + " of " + s.permits + " permits held",
      s.waiters.length ? " · " + s.waiters.length + " waiting" : ""));
    parts.push(table(null, [{ title: "holder" }, { title: "lease left", num: true }],
      s.holders.map((x) => h("tr", {}, cell("holder", x.holder), cell("expires", age(x.expires_in_ms), true))), "no holder"));
  }
  for (const m of gpu.models || []) {
    parts.push(h("p", { class: "muted" }, `model ${m.model} on ${m.device === null ? "CPU" : "device " + m.device}: ` +
      `${bytes(m.need_bytes)}, ${m.in_use} in use`));
  }
  for (const e of gpu.errors || []) parts.push(h("p", { class: "error" }, e));
  return parts;
}

export function overviewView(root) {
  const boxes = {};
  for (const name of ["summary", "queues", "inflight", "workers", "gpu", "consumers"]) boxes[name] = h("div", { id: name + "-box" });
  root.append(
    boxes.summary,
    section("Queues", boxes.queues),
    section("In flight", boxes.inflight),
    section("Workers", boxes.workers),
    section("GPU", boxes.gpu),
    section("Consumers of every group", boxes.consumers));
  let tick = 0;
  return {
    every: OVERVIEW_MS,
    async refresh() {
      const slow = tick++ % 4 === 0; // GPU figures and readiness every 2 s
      const [o, found, gpu, ready] = await Promise.all([
        api("/v1/overview"), api("/v1/inflight"),
        slow ? api("/v1/gpu") : null, slow ? api("/health/ready", { accept: [503] }) : null,
      ]);
      const now = Date.now();
      boxes.summary.replaceChildren(summary(o));
      boxes.queues.replaceChildren(queuesTable(o.partitions, now));
      boxes.inflight.replaceChildren(inflightTable(found));
      boxes.workers.replaceChildren(workersTable(o.workers));
      boxes.consumers.replaceChildren(consumersTable(o.consumers));
      if (gpu) boxes.gpu.replaceChildren(...gpuBox(gpu));
      if (ready) root.dataset.ready = ready.status === "ready" ? "ready" : ready.problems.join("; ");
      return "namespace " + o.namespace + (root.dataset.ready && root.dataset.ready !== "ready" ? " · not ready: " + root.dataset.ready : "");
    },
  };
}
