"""Preparing a raw task entry: whose id a bad entry answers under, and what is refused at intake.

Pure functions over an :class:`Entry`: no Redis needed.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sop_llm.handlers.tasks.prepare import SCAN_STRINGS, Prepared, prepare, readable_task_id
from sop_llm.schemas.errors import ErrorCode
from sop_llm.streams.entries import Entry
from sop_llm.streams.keys import Keys
from sop_llm.streams.urlguard import AllowList

KEYS = Keys("sop")
STREAM = KEYS.tasks("default", "high")
ENTRY_ID = "1767225600000-7"
DERIVED = f"default.high.{ENTRY_ID}"
SUBMITTED = b"task.submitted"


def prepared(
    data: bytes | None, type_: bytes | None = SUBMITTED, allow: AllowList | None = None
) -> Prepared:
    fields = {}
    if type_ is not None:
        fields["type"] = type_
    if data is not None:
        fields["data"] = data
    return prepare(
        Entry(STREAM, ENTRY_ID, fields), keys=KEYS, max_prompt_bytes=1 << 20,
        max_metadata_bytes=16 << 10, webhook_allow=allow,
    )  # fmt: skip


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


# item 6 of issue 24: a readable task_id is found whatever else is wrong with the entry
@pytest.mark.parametrize(
    ("type_", "data"),
    [
        pytest.param(b"task.cancel", b'{"task_id":"mine-1","model":"echo","prompt":"x"}',
                     id="wrong type"),
        pytest.param(None, b'{"task_id":"mine-1","model":"echo","prompt":"x"}', id="no type"),
        pytest.param(b"\xff\xfe", b'{"task_id":"mine-1","model":"echo"}', id="type not UTF-8"),
        pytest.param(SUBMITTED, b'{"task_id":"mine-1","model":"echo","prompt":"caf\xe9"}',
                     id="invalid UTF-8 elsewhere"),
        pytest.param(SUBMITTED, b'{"model":"echo","m":' + deep(5000) + b',"task_id":"mine-1"}',
                     id="deep nesting before it"),
        pytest.param(SUBMITTED, b'{"task_id":"mine-1","metadata":' + b"{\"a\":" * 3000,
                     id="deep and unterminated after it"),
        pytest.param(SUBMITTED, b'{"task_id":"mine-1","model":"echo","prompt":"x",}',
                     id="syntax error after it"),
        pytest.param(SUBMITTED, b'{"model": echo, "task_id": "mine-1", "prompt": [1,}',
                     id="syntax errors around it"),
        pytest.param(SUBMITTED, b'{"task_id":"mine-1","model":"echo","prompt":"x","task_id":7}',
                     id="duplicate: the last is no id"),
        pytest.param(SUBMITTED, b'{"task_id":"first","model":5,"task_id":"mine-1"',
                     id="duplicates"),
        pytest.param(SUBMITTED, b'{"task\\u005fid":"mine\\u002d1","model":[}', id="escapes"),
        pytest.param(SUBMITTED, b'{"task_id":"mine-1","model":"echo","prompt":"x","v":NaN',
                     id="NaN and truncated"),
    ],
)  # fmt: skip
def test_a_readable_task_id_is_used(type_: bytes | None, data: bytes) -> None:
    p = prepared(data, type_)
    assert (p.task_id, p.error_code, p.event) == ("mine-1", ErrorCode.INVALID_EVENT, None)


@pytest.mark.parametrize(
    ("type_", "data"),
    [
        pytest.param(SUBMITTED, None, id="no data"),
        pytest.param(b"task.cancel", None, id="wrong type, no data"),
        pytest.param(SUBMITTED, b'{"model":"echo"}', id="no task_id"),
        pytest.param(SUBMITTED, b'{"task_id":"has space","model":"echo"}', id="malformed id"),
        pytest.param(SUBMITTED, b'{"task_id":"mine-1\\n","model":"echo"}', id="trailing newline"),
        pytest.param(b"task.cancel", b'{"task_id":"mine-1\\n"}', id="wrong type, newline"),
        pytest.param(SUBMITTED, b'{"task_id":"caf\xe9","model":"echo"}', id="id not UTF-8"),
        pytest.param(SUBMITTED, b'{"task_id":12,"model":"echo"}', id="id a number"),
        pytest.param(SUBMITTED, b'{"metadata":{"task_id":"victim"},"model":"echo"}',
                     id="nested only"),
        pytest.param(SUBMITTED, b'{"metadata":{"task_id":"victim"},"model":[}', id="nested, bad"),
        pytest.param(SUBMITTED, b'{"prompt":"say \\"task_id\\": \\"victim\\"", ', id="in a string"),
        pytest.param(SUBMITTED, b'{"a":"task_id":"victim", ', id="not a key"),
        pytest.param(SUBMITTED, b'[{"task_id":"victim"}]', id="not an object"),
        pytest.param(SUBMITTED, b'{"prompt":"open, "task_id":"victim"}', id="unterminated"),
    ],
)  # fmt: skip
def test_the_derived_id_only_when_none_is_readable(type_: bytes | None, data: bytes | None) -> None:
    p = prepared(data, type_)
    assert (p.task_id, p.error_code) == (DERIVED, ErrorCode.INVALID_EVENT)


task_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:\-]{0,40}\Z")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)
others = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k != "task_id"), json_values, max_size=5
)


@st.composite
def hostile_members(draw: st.DrawFn) -> list[bytes]:
    """Members of an object other than task_id: any JSON (NaN too), raw bytes that are not
    UTF-8, deep nesting, a task_id of some other task nested inside."""
    members = [
        json.dumps(k).encode() + b":" + json.dumps(v).encode() for k, v in draw(others).items()
    ]
    bad_bytes = st.binary(max_size=6).map(lambda b: b.replace(b'"', b"").replace(b"\\", b""))
    extra = st.one_of(
        bad_bytes.map(lambda b: b'"prompt":"' + b + b'\xff"'),
        st.integers(1, 3000).map(lambda n: b'"metadata":' + deep(n)),
        task_ids.map(lambda t: b'"metadata":{"task_id":' + json.dumps(t).encode() + b"}"),
    )
    return members + draw(st.lists(extra, max_size=3))


@given(
    task_id=task_ids,
    members=hostile_members(),
    position=st.integers(0, 10),
    type_=st.sampled_from([SUBMITTED, b"task.cancel", b"", b"\xff", None]),
    tail=st.sampled_from([b"}", b"", b",", b',"model":', b"]]]", b"}}"]),
)
def test_a_top_level_task_id_is_found_in_any_object(
    task_id: str, members: list[bytes], position: int, type_: bytes | None, tail: bytes
) -> None:
    members.insert(min(position, len(members)), b'"task_id":' + json.dumps(task_id).encode())
    data = b"{" + b",".join(members) + tail
    p = prepared(data, type_)
    assert p.task_id == task_id
    assert p.error_code == ErrorCode.INVALID_EVENT


malformed_ids = st.one_of(
    task_ids.map(lambda t: t + "\n"),
    task_ids.map(lambda t: t + " "),
    st.text(max_size=8).filter(lambda t: not t[:1].isalnum() or not t.isascii()),
    st.integers(),
    st.none(),
)


@given(task_id=malformed_ids, rest=others, type_=st.sampled_from([SUBMITTED, b"task.cancel"]))
def test_without_a_well_formed_top_level_task_id_the_id_is_derived(
    task_id: Any, rest: dict[str, Any], type_: bytes
) -> None:
    data = {"task_id": task_id, **rest, "metadata": {"task_id": "victim"}}
    p = prepared(json.dumps(data).encode(), type_)
    assert p.task_id == DERIVED


def test_the_scan_of_malformed_json_is_bounded() -> None:
    late = b'{"a":[' + b'"",' * SCAN_STRINGS + b'1],"task_id":"late",'
    early = b'{"task_id":"early","a":[' + b'"",' * SCAN_STRINGS + b"1],"
    assert readable_task_id(late) is None
    assert readable_task_id(early) == "early"


# item 8 of issue 24: the SDK's static webhook check, for plain-XADD tasks too
def event(url: str, task_id: str | None = "hook-1") -> bytes:
    body = {"model": "echo", "prompt": "x", "webhook_url": url}
    if task_id is not None:
        body["task_id"] = task_id
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is a loopback address"),
        ("http://[::1]/hook", "::1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data", "a cloud metadata address"),
        ("http://10.1.2.3/hook", "10.1.2.3 is a private address"),
        ("http://localhost/hook", "localhost names this host"),
        ("http://api.localhost/hook", "names this host"),
        ("http://metadata.google.internal/", "names this host or a metadata service"),
        ("http://0x7f000001/hook", "a numeric host form"),
        ("http://[::ffff:127.0.0.1]/hook", "an IPv4-mapped IPv6 address"),
    ],
)
def test_an_unsafe_webhook_url_is_refused_at_intake(url: str, reason: str) -> None:
    p = prepared(event(url), allow=AllowList())
    assert (p.task_id, p.error_code, p.event) == ("hook-1", ErrorCode.INVALID_EVENT, None)
    assert p.error.startswith("webhook_url: webhook URL refused: ")
    assert reason in p.error


def test_a_refused_webhook_task_without_id_gets_the_derived_id() -> None:
    p = prepared(event("http://localhost/h", task_id=None), allow=AllowList())
    assert (p.task_id, p.error_code) == (DERIVED, ErrorCode.INVALID_EVENT)


def test_public_names_and_the_allow_list_pass_and_no_name_is_resolved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_dns(*args: object, **kwargs: object) -> object:
        raise AssertionError("intake must not resolve a webhook host")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket, "gethostbyname", no_dns)
    public = "https://internal-looking.example.com/h"  # may resolve inward: delivery decides
    assert prepared(event(public), allow=AllowList()).error_code is None
    allow = AllowList.parse(["127.0.0.1", "hooks.localhost", "10.0.0.0/8"])
    for url in ("http://127.0.0.1:9/h", "https://hooks.localhost/h", "http://10.1.2.3/h"):
        p = prepared(event(url), allow=allow)
        assert (p.error_code, p.task_id) == (None, "hook-1"), p.error
    assert prepared(event("http://[::1]/h"), allow=allow).error_code == ErrorCode.INVALID_EVENT
    # a caller that passes no allow-list (None) leaves every URL to the delivery's guard
    assert prepared(event("http://127.0.0.1/h"), allow=None).error_code is None
