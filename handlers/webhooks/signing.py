"""Standard Webhooks signing (symmetric, ``v1``): secrets, signatures and the three headers.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``; the signature is the base64
HMAC-SHA256 of it under a secret whose bytes are the base64 decoding of what follows
``whsec_``. Several secrets (key rotation) give several ``v1,<sig>`` values, space-separated,
newest first. See https://www.standardwebhooks.com/ and ``docs/webhooks.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Final

from sop_llm.schemas.errors import SopError

SECRET_PREFIX: Final = "whsec_"
SIGNATURE_VERSION: Final = "v1"
HEADER_ID: Final = "webhook-id"
HEADER_TIMESTAMP: Final = "webhook-timestamp"
HEADER_SIGNATURE: Final = "webhook-signature"
# the spec asks for at least 24 random bytes (192 bits) and at most 512 bits
MIN_SECRET_BYTES: Final = 24
MAX_SECRET_BYTES: Final = 64
DEFAULT_TOLERANCE_S: Final = 300


class SignatureError(SopError):
    """A signature that does not verify: wrong secret, altered body, stale timestamp."""


def decode_secret(secret: str) -> bytes:
    """The key bytes of a ``whsec_`` secret.

    Raises ``ValueError`` when the prefix is missing, the rest is not base64, or the key is
    not 24 to 64 bytes long. The message never repeats the secret.
    """
    value = secret.strip()
    if not value.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(value[len(SECRET_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"a webhook secret must be {SECRET_PREFIX!r} + base64") from exc
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise ValueError(
            f"a webhook secret must decode to {MIN_SECRET_BYTES}-{MAX_SECRET_BYTES} bytes, "
            f"not {len(key)}"
        )
    return key


def signed_content(msg_id: str, timestamp: int, body: bytes) -> bytes:
    if "." in msg_id:
        # a '.' in the id would let one (id, timestamp) pair pass for another
        raise ValueError("a webhook id must not contain '.'")
    return f"{msg_id}.{timestamp}.".encode() + body


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature."""
    digest = hmac.new(key, signed_content(msg_id, timestamp, body), hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


class Signer:
    """Signs deliveries with every active secret (newest first)."""

    __slots__ = ("_keys",)

    def __init__(self, secrets: Sequence[str]) -> None:
        """Raises ``ValueError`` for a malformed secret (see :func:`decode_secret`)."""
        self._keys = tuple(decode_secret(s) for s in secrets if s.strip())

    @property
    def active(self) -> int:
        """How many secrets sign each delivery; 0 means deliveries go out unsigned."""
        return len(self._keys)

    def headers(self, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The Standard Webhooks headers of one attempt (``timestamp``: now, in seconds)."""
        ts = int(time.time()) if timestamp is None else timestamp
        out = {HEADER_ID: msg_id, HEADER_TIMESTAMP: str(ts)}
        if self._keys:
            out[HEADER_SIGNATURE] = " ".join(signature(k, msg_id, ts, body) for k in self._keys)
        return out


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Check a received delivery the way a receiver should (for tools and tests).

    ``headers`` must be looked up case-insensitively by the caller's mapping or already be
    lower-case. Raises :class:`SignatureError` when a header is missing, the timestamp is
    further than ``tolerance_s`` from ``now``, or no ``v1`` signature matches any secret.
    """
    try:
        msg_id = headers[HEADER_ID]
        ts_text = headers[HEADER_TIMESTAMP]
        sent = headers[HEADER_SIGNATURE]
    except KeyError as exc:
        raise SignatureError(f"missing header {exc.args[0]}") from exc
    try:
        ts = int(ts_text)
    except ValueError as exc:
        raise SignatureError("webhook-timestamp is not an integer") from exc
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    prefix = SIGNATURE_VERSION + ","
    candidates = [s[len(prefix) :] for s in sent.split() if s.startswith(prefix)]
    for secret in secrets:
        expected = signature(decode_secret(secret), msg_id, ts, body).partition(",")[2]
        if any(hmac.compare_digest(expected, c) for c in candidates):
            return
    raise SignatureError("no signature matches")
