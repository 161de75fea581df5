"""The report of ``bench/compare.py``: medians with min and max over rounds, the ratios the
benchmarks issue asks for, a Markdown table, PNG plots (matplotlib) and the versions measured."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.compare_systems import LABELS, PEER_MODULES, PROJECT_PY  # noqa: E402


def agg(vals: list[float]) -> list[float]:
    return [statistics.median(vals), min(vals), max(vals)]


def summarise(runs: list[dict[str, Any]], systems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in systems:
        mine = [x for x in runs if x["system"] == s]
        if not mine:
            continue
        m: dict[str, Any] = {"n": mine[0]["throughput"]["n"]}
        for k in ("tasks_per_s", "tasks_per_s_from_spawn", "consumer_cpu_us_per_task",
                  "redis_cpu_us_per_task", "redis_cmds_per_task_total"):  # fmt: skip
            m[k] = agg([x["throughput"][k] for x in mine])
        if all(x["serial"] for x in mine):
            m["serial_p50_ms"] = agg([x["serial"]["p50_ms"] for x in mine])
            m["serial_p99_ms"] = agg([x["serial"]["p99_ms"] for x in mine])
        out[s] = m
    return out


def ratios(summary: dict[str, Any]) -> dict[str, Any]:
    tp = {s: v["tasks_per_s"][0] for s, v in summary.items()}
    out: dict[str, Any] = {}
    if "sop" not in tp:
        return out
    peers = {s: v for s, v in tp.items() if s in PEER_MODULES}
    task_queues = {s: v for s, v in peers.items() if s in ("arq", "taskiq", "celery")}
    if "loop" in tp:
        out["sop/loop"] = tp["sop"] / tp["loop"]
        for other in ("sop-256", "sop-2"):
            if other in tp:
                out[f"{other}/loop"] = tp[other] / tp["loop"]
    if peers:
        best = max(peers, key=peers.__getitem__)
        out["sop/best peer"] = (tp["sop"] / peers[best], best)
    if task_queues:
        best = max(task_queues, key=task_queues.__getitem__)
        out["sop/best of arq,taskiq,celery"] = (tp["sop"] / task_queues[best], best)
    return out


def fmt(v: list[float], digits: int = 0) -> str:
    return f"{v[0]:,.{digits}f} [{v[1]:,.{digits}f}-{v[2]:,.{digits}f}]"


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| system | N | tasks/s | consumer CPU µs/task | Redis CPU µs/task "
        "| Redis commands/task | serial p50 ms | serial p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, m in summary.items():
        row = [
            LABELS[s], f"{m['n']:,}", fmt(m["tasks_per_s"]), fmt(m["consumer_cpu_us_per_task"]),
            fmt(m["redis_cpu_us_per_task"]), f"{m['redis_cmds_per_task_total'][0]:.2f}",
        ]  # fmt: skip
        if "serial_p50_ms" in m:
            row += [fmt(m["serial_p50_ms"], 2), fmt(m["serial_p99_ms"], 2)]
        else:
            row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, Any], outdir: Path, note: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    labels = [LABELS[s] for s in names]
    colors = ["#1f6feb" if s.startswith("sop") else "#8b949e" for s in names]
    colors = ["#2da44e" if s == "loop" else c for s, c in zip(names, colors, strict=True)]
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    med = [summary[s]["tasks_per_s"][0] for s in names]
    err = [
        [m - summary[s]["tasks_per_s"][1] for s, m in zip(names, med, strict=True)],
        [summary[s]["tasks_per_s"][2] - m for s, m in zip(names, med, strict=True)],
    ]
    ax.barh(labels, med, xerr=err, color=colors, capsize=3)
    for y, s in enumerate(names):
        # the label goes past the max whisker, so the two never overlap
        ax.text(summary[s]["tasks_per_s"][2], y, f"  {med[y]:,.0f}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("tasks/s (median of rounds; whiskers: min-max)")
    ax.set_title("No-op task throughput, publish-to-result (one process unless stated)")
    ax.set_xlim(0, max(summary[s]["tasks_per_s"][2] for s in names) * 1.25)
    fig.text(0.01, 0.01, note, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths.append(outdir / "benchmarks-throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    lat = [s for s in names if "serial_p50_ms" in summary[s]]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ys = range(len(lat))
    p50 = [summary[s]["serial_p50_ms"][0] for s in lat]
    p99 = [summary[s]["serial_p99_ms"][0] for s in lat]
    ax.barh([y - 0.2 for y in ys], p50, height=0.4, label="p50", color="#1f6feb")
    ax.barh([y + 0.2 for y in ys], p99, height=0.4, label="p99", color="#8b949e")
    for y, a, b in zip(ys, p50, p99, strict=True):
        ax.text(a, y - 0.2, f" {a:.2f}", va="center", fontsize=8)
        ax.text(b, y + 0.2, f" {b:.2f}", va="center", fontsize=8)
    ax.set_yticks(list(ys), [LABELS[s] for s in lat])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("publish-to-result latency, one task at a time (ms, log scale; median of rounds)")
    ax.set_title("Serial latency")
    ax.legend(loc="lower right")
    fig.text(0.01, 0.01, note, fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    paths.append(outdir / "benchmarks-latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def versions(r: redis.Redis) -> dict[str, Any]:
    peers = ["faststream", "arq", "taskiq", "taskiq-redis", "celery", "kombu", "redis",
             "hiredis", "uvloop", "pydantic", "matplotlib"]  # fmt: skip
    out: dict[str, Any] = {"peers_venv": {}}
    for p in peers:
        try:
            out["peers_venv"][p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out["peers_venv"][p] = None
    code = (
        "import json; from importlib import metadata as m; print(json.dumps({p: m.version(p) "
        "for p in ('sop-llm', 'redis', 'hiredis', 'uvloop', 'pydantic')}))"
    )
    done = subprocess.run([PROJECT_PY, "-c", code], capture_output=True, text=True, check=False)
    out["project_venv"] = json.loads(done.stdout) if done.returncode == 0 else done.stderr
    out["python"] = platform.python_version()
    out["redis_server"] = r.info("server")["redis_version"]
    out["platform"] = platform.platform()
    out["cpus"] = os.cpu_count()
    return out
