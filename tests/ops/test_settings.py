from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from sop_llm.ops.app import build_worker
from sop_llm.ops.settings import Settings, redact_url
from sop_llm.providers.registry import ModelRegistry


def test_names_fixed_by_the_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOP_REDIS_URL", "rediss://user:pw@redis.example:6380/2")
    monkeypatch.setenv("SOP_NAMESPACE", "tenant1")
    monkeypatch.setenv("SOP_PARTITIONS", "urgent, normal ,bulk")
    monkeypatch.setenv("SOP_SIDECAR_PORT", "9000")
    s = Settings()
    assert s.redis_url_value == "rediss://user:pw@redis.example:6380/2"
    assert s.partitions == ("urgent", "normal", "bulk")
    assert (s.namespace, s.sidecar_host, s.sidecar_port) == ("tenant1", "127.0.0.1", 9000)
    assert "pw" not in repr(s) and "pw" not in str(s.model_dump())
    assert s.producer_config().default_priority == "normal"


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SOP_REDIS_URL", "SOP_PARTITIONS", "SOP_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(_env_file=None)
    assert s.redis_url is None and s.namespace == "sop"
    assert s.partitions == ("high", "normal", "low")
    assert (s.echo_slots, s.echo_tokens_per_s, s.max_prompt_bytes) == (64, 0.0, 1 << 20)


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOP_PARTITIONS", " , ")
    with pytest.raises(ValidationError, match="partitions"):
        Settings()


def test_webhook_schedule_is_parsed_into_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOP_WEBHOOK_SCHEDULE_S", raising=False)
    assert Settings(_env_file=None).webhook_schedule_s == (
        0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0,
    )  # fmt: skip
    monkeypatch.setenv("SOP_WEBHOOK_SCHEDULE_S", " 0, 1.5 ,60")
    schedule = Settings(_env_file=None).webhook_schedule_s
    assert schedule == (0.0, 1.5, 60.0) and all(type(d) is float for d in schedule)


@pytest.mark.parametrize("value", ["soon", "5,-1", "", " , ", "5,nan", "inf"])
def test_a_bad_webhook_schedule_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SOP_WEBHOOK_SCHEDULE_S", value)
    with pytest.raises(ValidationError, match="webhook_schedule_s"):
        Settings(_env_file=None)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://app:hunter2@h/1", "rediss://app:***@h/1"),
        ("redis://h:6379", "redis://h:6379"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_sentinel_only_config_gives_a_producer_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's and the HTTP API's producers get their client from ops.connect; a URL is not
    needed under Sentinel."""
    for name in ("SOP_REDIS_URL",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOP_REDIS_SENTINELS", "127.0.0.1:26379")
    monkeypatch.setenv("SOP_REDIS_SENTINEL_MASTER", "main")
    assert Settings().producer_config().namespace == "sop"
    monkeypatch.delenv("SOP_REDIS_SENTINELS")
    monkeypatch.delenv("SOP_REDIS_SENTINEL_MASTER")
    with pytest.raises(ValueError, match="SOP_REDIS_URL"):
        Settings().producer_config()


def test_the_unknown_model_grace_reaches_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOP_UNKNOWN_MODEL_GRACE_S", "2.5")
    worker = build_worker(Settings(_env_file=None), Redis(), ModelRegistry())
    assert worker._config.unknown_model_grace_s == 2.5
