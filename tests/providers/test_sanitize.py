"""The provider error sanitiser: no credentials, no request text, bounded, whatever comes back."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.errors import BadRequestError, error_for_status
from sop_llm.providers.sanitize import (
    ECHO_CHARS,
    MAX_ERROR_CHARS,
    REDACTED,
    REQUEST_TEXT,
    Redaction,
    sanitize,
)
from sop_llm.schemas.errors import ErrorCode
from sop_llm.schemas.task import ChatMessage

KEY = "TopSecretValue-42"  # not key-shaped: only the configured secret can find it
PROMPT = 'My card is 4417 1234 5678 9113.\nPlease "summarise" my last statement for me.'


SECRET = "abc.def-ghi_jkl"


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"Authorization: Bearer {SECRET}", SECRET),
        (f'{{"authorization": "Bearer {SECRET}"}}', SECRET),
        (f"[('authorization', 'Bearer {SECRET}')]", SECRET),
        (f"x-api-key: {SECRET}", SECRET),
        (f'{{"x-api-key":"{SECRET}"}}', SECRET),
        (f"Api-Key={SECRET}", SECRET),
        (f"GET /v1/models?api_key={SECRET}&x=1", SECRET),
        (f"proxy-authorization: Basic {SECRET}", SECRET),
        (f"Cookie: session={SECRET}; theme=dark", SECRET),
        (f"the header was Bearer {SECRET}", SECRET),
        (f'"password": "{SECRET}"', SECRET),
        ("Incorrect API key: sk-proj-Ab12Cd34Ef56Gh78Ij90", "Ab12Cd34Ef56Gh78Ij90"),
        ("key sk-ant-api03-Ab12Cd34Ef56Gh78Ij90 is invalid", "Ab12Cd34Ef56Gh78Ij90"),
        ("Incorrect API key provided: sk-abc1***************************wxyz", "abc1"),
    ],
)
def test_credentials_go_by_their_shape(text: str, secret: str) -> None:
    clean = sanitize(f"HTTP 401: {text}")
    assert secret not in clean
    assert REDACTED in clean
    assert clean.startswith("HTTP 401: ")


def test_a_named_header_keeps_its_name_and_scheme() -> None:
    clean = sanitize('headers {"Authorization": "Bearer abc.def-ghi_jkl", "x-api-key": "k1k2k3k4"}')
    assert clean == f'headers {{"Authorization": "Bearer {REDACTED}", "x-api-key": "{REDACTED}"}}'


def test_the_configured_secret_goes_wherever_it_is() -> None:
    redaction = Redaction.of(secrets=[KEY])
    for text in (f"bad key {KEY}!", f"{KEY}{KEY}", f"token={KEY}", f'"{KEY}"'):
        assert KEY not in sanitize(text, redaction)
    assert sanitize(f"bad key {KEY}!", redaction) == f"bad key {REDACTED}!"


def test_a_secret_is_never_cut_in_half_by_the_bound() -> None:
    # the secret sits across the point where shapes stop being looked for
    text = "x" * 1995 + KEY + "y" * 3000
    clean = sanitize(text, Redaction.of(secrets=[KEY]))
    assert not any(KEY[:n] in clean for n in range(4, len(KEY) + 1))


def test_the_echoed_prompt_goes_whole_escaped_or_in_part() -> None:
    redaction = Redaction.of(texts=[PROMPT])
    quoted = json.dumps(PROMPT)
    for text in (
        f"invalid content: {PROMPT}",
        f'invalid body: {{"content": {quoted}}}',
        f"invalid: '{PROMPT[5:60]}...'",
        f"invalid: {json.dumps(PROMPT[20:])}",
    ):
        clean = sanitize(text, redaction)
        assert REQUEST_TEXT in clean
        assert "4417" not in clean and "summarise" not in clean, clean


def test_short_coincidences_with_the_prompt_stay() -> None:
    redaction = Redaction.of(texts=["How many tokens fit in the window of this model?"])
    text = "This model's maximum context length is 4096 tokens."
    assert sanitize(text, redaction) == text


def test_bounded_single_line() -> None:
    clean = sanitize("line one\nline two\r\n\x00" + "z" * 5000)
    assert len(clean) == MAX_ERROR_CHARS and clean.endswith("…")
    assert clean.startswith("line one line two z")


def test_a_huge_prompt_costs_little_and_a_repetitive_one_is_withheld() -> None:
    words = " ".join(f"w{i}" for i in range(150_000))  # about 1 MiB, no repeats
    redaction = Redaction.of(texts=[words])
    started = time.perf_counter()
    clean = sanitize(f"HTTP 400: rejected: {words[500_000:503_000]}", redaction)
    assert time.perf_counter() - started < 2
    assert clean == f"HTTP 400: rejected: {REQUEST_TEXT}"
    periodic = Redaction.of(texts=["ab" * 500_000])
    assert sanitize("HTTP 400: " + "ab" * 1000, periodic) == REQUEST_TEXT


def test_every_provider_error_is_sanitised() -> None:
    err = BadRequestError("Authorization: Bearer abc.def-ghi_jkl " + "z" * 900)
    assert "abc.def" not in err.message and len(err.message) == MAX_ERROR_CHARS
    mapped = error_for_status(
        401, f"bad key {KEY}", redaction=Redaction.of(secrets=[KEY], texts=[PROMPT])
    )
    assert mapped.code == ErrorCode.AUTH and mapped.message == f"HTTP 401: bad key {REDACTED}"


def test_for_request_takes_the_key_the_url_password_and_every_message() -> None:
    request = GenerationRequest(
        model="m",
        messages=[
            ChatMessage(role="system", content="You are the assistant of ACME Corporation."),
            ChatMessage(role="user", content=PROMPT),
        ],
    )
    redaction = Redaction.for_request(request, key=KEY, base_url="https://u:pw-in-url@h/v1")
    text = f"{KEY} pw-in-url You are the assistant of ACME Corporation. {PROMPT}"
    clean = sanitize(text, redaction)
    assert KEY not in clean and "pw-in-url" not in clean
    assert "ACME" not in clean and "4417" not in clean


_visible = st.characters(blacklist_categories=("Cc", "Cs"))


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.text(_visible, min_size=2 * ECHO_CHARS, max_size=400),
    data=st.data(),
    before=st.text(_visible, max_size=60),
    after=st.text(_visible, max_size=60),
)
def test_no_copy_of_the_prompt_survives(
    prompt: str, data: st.DataObject, before: str, after: str
) -> None:
    start = data.draw(st.integers(0, len(prompt) - (2 * ECHO_CHARS - 1)))
    end = data.draw(st.integers(start + 2 * ECHO_CHARS - 1, len(prompt)))
    clean = sanitize(f"{before}{prompt[start:end]}{after}", Redaction.of(texts=[prompt]))
    n = 2 * ECHO_CHARS - 1
    copies = [clean[i : i + n] for i in range(len(clean) - n + 1) if clean[i : i + n] in prompt]
    assert copies == [], clean


@settings(max_examples=200, deadline=None)
@given(
    key=st.text(_visible, min_size=4, max_size=80),
    before=st.text(_visible, max_size=200),
    after=st.text(_visible, max_size=200),
)
def test_no_configured_key_survives(key: str, before: str, after: str) -> None:
    clean = sanitize(f"{before}{key}{after}", Redaction.of(secrets=[key]))
    assert key not in clean
