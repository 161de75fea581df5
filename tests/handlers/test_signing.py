"""Standard Webhooks signing, checked against the spec's scheme computed independently here."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sop_llm.handlers.webhooks.signing import SignatureError, Signer, decode_secret, verify


def new_secret(n: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(n)).decode()


def spec_signature(secret: str, msg_id: str, ts: str, body: bytes) -> str:
    # from the spec's text: key = base64-decode(secret minus "whsec_"),
    # content = "{msg_id}.{timestamp}.{payload}", signature = "v1," + base64(HMAC-SHA256)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, msg_id.encode() + b"." + ts.encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_known_vector() -> None:
    # the reference libraries' published test vector
    signer = Signer(["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
    headers = signer.headers("msg_p5jXN8AQM9LWM0D4loKWxJek", b'{"test": 2432232314}', 1614265330)
    assert headers == {
        "webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
        "webhook-timestamp": "1614265330",
        "webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    }


@given(body=st.binary(max_size=2048), ts=st.integers(min_value=0, max_value=2**40))
def test_matches_the_spec_for_any_body(body: bytes, ts: int) -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    headers = Signer([secret]).headers("msg_abc", body, ts)
    assert headers["webhook-signature"] == spec_signature(secret, "msg_abc", str(ts), body)


def test_rotation_signs_with_every_secret_newest_first() -> None:
    new, old = new_secret(), new_secret(24)
    headers = Signer([new, old]).headers("msg_1", b"{}", 1700000000)
    assert headers["webhook-signature"].split(" ") == [
        spec_signature(new, "msg_1", "1700000000", b"{}"),
        spec_signature(old, "msg_1", "1700000000", b"{}"),
    ]


def test_no_secret_no_signature_header() -> None:
    signer = Signer([])
    assert signer.active == 0
    assert "webhook-signature" not in signer.headers("msg_1", b"{}")


def test_timestamp_defaults_to_now() -> None:
    import time

    ts = int(Signer([new_secret()]).headers("msg_1", b"")["webhook-timestamp"])
    assert abs(ts - time.time()) < 5


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "must start with 'whsec_'"),
        ("whsec_not*base64!", "base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "24-64 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "24-64 bytes"),
    ],
)
def test_malformed_secrets_are_refused(secret: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_secret(secret)


def test_id_with_a_dot_is_refused() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        Signer([new_secret()]).headers("msg.1", b"{}")


def test_verify_round_trip_and_failures() -> None:
    old, new = new_secret(), new_secret()
    body = b'{"type":"task.completed"}'
    headers = Signer([new, old]).headers("msg_x", body, 1700000000)
    verify([old], headers, body, now=1700000010)  # a receiver still on the old secret
    with pytest.raises(SignatureError, match="no signature"):
        verify([new_secret()], headers, body, now=1700000010)
    with pytest.raises(SignatureError, match="no signature"):
        verify([new], headers, body + b" ", now=1700000010)
    with pytest.raises(SignatureError, match="tolerance"):
        verify([new], headers, body, now=1700000000 + 301)
    with pytest.raises(SignatureError, match="missing header"):
        verify([new], {"webhook-id": "msg_x"}, body)
