"""The deployment files agree with the code: compose.yaml, the Dockerfile, the collector config
and docs/operations.md. (No Docker engine is needed: the files are parsed, not run.)"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from sop_llm.handlers.metrics import Metrics
from sop_llm.ops.settings import Settings
from tests.conftest import ROOT

_ENV_DEFAULT = re.compile(r"^\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}$")


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return doc


def _env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): str(v) for k, v in raw.items()}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages() -> list[str]:
    """The import root and the folders it links to (the wheel's sop_llm.* packages)."""
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    roots = [p.rstrip("*") for p in include]
    linked = sorted(p.name for r in roots for p in (ROOT / r).iterdir() if p.is_symlink())
    return [*roots, *linked]


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def _dockerfile() -> list[Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            image, _, name = args.partition(" AS ")
            stages.append(Stage(image=image.strip(), name=name.strip() or None))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


class _GivenOnly(Settings):
    """Settings from the given values alone: not this process's environment or .env file."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


# ---- compose.yaml ------------------------------------------------------------------------------


def test_compose_has_the_services() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", "worker", "sidecar", "otel-collector"}
    assert services["otel-collector"]["profiles"] == ["otel"]
    for name in ("worker", "sidecar"):
        assert services[name]["command"] == [name]
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_sop_variable_is_a_setting_and_valid() -> None:
    """A misspelt SOP_ variable would be ignored silently (extra="ignore"): refuse it here."""
    fields = {f"SOP_{name.upper()}" for name in Settings.model_fields}
    for name, service in _compose()["services"].items():
        env = {k: v for k, v in _env(service).items() if k.startswith("SOP_")}
        unknown = set(env) - fields
        assert not unknown, f"{name}: not settings: {sorted(unknown)}"
        values: dict[str, str] = {}
        for key, value in env.items():
            m = _ENV_DEFAULT.match(value)
            if m is None:
                values[key.removeprefix("SOP_").lower()] = value
            elif m["default"] is not None:  # ${VAR:-default}: the default must be valid too
                values[key.removeprefix("SOP_").lower()] = m["default"]
        _GivenOnly.model_validate(values)


def test_redis_keeps_every_acknowledged_write() -> None:
    redis = _compose()["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync always" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "ports" not in redis  # reachable inside the compose network only


def test_processes_reach_redis_and_the_sidecar_is_guarded() -> None:
    services = _compose()["services"]
    for name in ("worker", "sidecar"):
        assert _env(services[name])["SOP_REDIS_URL"] == "redis://redis:6379/0"
    sidecar = _env(services["sidecar"])
    assert sidecar["SOP_SIDECAR_HOST"] == "0.0.0.0"
    assert sidecar["SOP_SIDECAR_TOKEN"].startswith("${SOP_SIDECAR_TOKEN:?")  # required
    assert services["sidecar"]["ports"] == [f"127.0.0.1:{sidecar['SOP_SIDECAR_PORT']}:8080"]
    assert "ports" not in services["worker"]
    [check] = [a for a in services["sidecar"]["healthcheck"]["test"] if "urlopen" in a]
    compile(check, "<sidecar healthcheck>", "exec")
    assert "/health/ready" in check and "SOP_SIDECAR_TOKEN" in check


def test_workers_get_their_grace_period() -> None:
    worker = _compose()["services"]["worker"]
    grace = float(
        _env(worker).get("SOP_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default)
    )
    period = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert period is not None and int(period[1]) > grace


def test_traces_go_to_the_collector() -> None:
    services = _compose()["services"]
    collector_yaml = ROOT / "deploy" / "otel-collector.yaml"
    [mount] = services["otel-collector"]["volumes"]
    assert mount.startswith("./deploy/otel-collector.yaml:")
    config: dict[str, Any] = yaml.safe_load(collector_yaml.read_text())
    http_endpoint = config["receivers"]["otlp"]["protocols"]["http"]["endpoint"]
    assert http_endpoint.startswith("0.0.0.0:")  # reachable from the other containers
    for name in ("worker", "sidecar"):
        env = _env(services[name])
        assert (
            env["OTEL_EXPORTER_OTLP_ENDPOINT"]
            == "http://otel-collector:" + (http_endpoint.split(":")[1])
        )
        assert env["SOP_TRACE_CONTENT"] == "false"
    for kind, pipeline in config["service"]["pipelines"].items():
        for section in ("receivers", "processors", "exporters"):
            missing = set(pipeline.get(section, [])) - set(config.get(section) or {})
            assert not missing, f"{kind} pipeline names undefined {section}: {missing}"


# ---- Dockerfile ----------------------------------------------------------------------------------


def test_the_final_stage_runs_sop_llm_as_a_non_root_user() -> None:
    stages = _dockerfile()
    final = stages[-1]
    assert final.name == "runtime"
    for stage in (final, next(s for s in stages if s.name == "local")):
        [user] = stage.all("USER")
        assert user.split(":")[0] not in ("root", "0"), f"{stage.name} runs as root"
        assert json.loads(stage.all("ENTRYPOINT")[-1]) == ["sop-llm"]
        assert json.loads(stage.all("CMD")[-1]) == ["worker"]
    assert "sop-llm" in _pyproject()["project"]["scripts"]


def test_the_runtime_installs_only_wheels() -> None:
    stages = {s.name: s for s in _dockerfile()}
    assert stages["builder"].image == "${PYTHON_IMAGE}"
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    for name in ("runtime", "local"):
        stage = stages[name]
        assert stage.image == "base"
        installs = [r for r in stage.all("RUN") if "pip install" in r]
        assert installs and all("--no-index" in r for r in installs), name
        assert not stage.all("COPY"), f"{name} copies sources instead of installing wheels"
        assert not any("build-essential" in r for r in stage.all("RUN"))
    local = " ".join(stages["builder-local"].all("RUN") + stages["builder-local"].all("ARG"))
    assert "-DGGML_NATIVE=OFF" in local and "local]" in local


def test_the_image_is_built_from_every_package() -> None:
    builder = next(s for s in _dockerfile() if s.name == "builder")
    copied = {src for args in builder.all("COPY") for src in args.split()[:-1]}
    ignore = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    rules = [ln for ln in ignore if not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore lists what goes in, not what stays out"
    for path in ["pyproject.toml", "README.md", *_packages()]:
        assert path in copied, f"the builder does not copy {path}"
        assert f"!{path}" in ignore or f"!{path}/" in ignore, f".dockerignore leaves out {path}"
    extras = set(re.findall(r"\[([a-z,]+)\]", " ".join(builder.all("RUN")))[0].split(","))
    assert extras <= set(_pyproject()["project"]["optional-dependencies"])


# ---- docs/operations.md ------------------------------------------------------------------------


def _exported(metric: Metric) -> str:
    return metric.name + "_total" if metric.type == "counter" else metric.name


@pytest.mark.parametrize("metric", list(Metrics().registry.collect()), ids=lambda m: m.name)
def test_every_metric_is_documented(metric: Metric) -> None:
    assert f"`{_exported(metric)}" in (ROOT / "docs" / "operations.md").read_text()
