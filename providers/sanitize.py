"""Provider error text made safe to store and log.

An error a backend sends back is foreign text, and it ends up in the task's result, its dead
letter, its status record and the logs. A proxy may echo the request's headers into it, a
server may quote the prompt. :func:`sanitize` is applied to every :class:`ProviderError`
message (in its constructor) and removes:

* credentials by their shape: the value after a credential header or field name
  (``Authorization``, ``Proxy-Authorization``, ``X-Api-Key``, ``Api-Key``, ``Cookie``,
  ``password``, ``secret``, ``access_token``... in ``Name: value``, ``"name": "value"``,
  ``name=value`` and ``('name', 'value')`` forms), ``Bearer``/``Basic`` credentials, and
  key-shaped tokens (``sk-...``, ``sk-ant-...``, ``hf_...``, ``AIza...``);
* every secret of :attr:`Redaction.secrets` (the adapter's API key), wherever it appears;
* the request's own text (:attr:`Redaction.texts`): the whole of each text of at least
  :data:`MIN_TEXT_CHARS` characters, and every stretch copied from one, in its plain,
  JSON-escaped or Python-repr form: a copy of ``2 * ECHO_CHARS - 1`` (31) characters or more
  always, a shorter one of at least :data:`ECHO_CHARS` (16) often;
* control characters (a newline could forge a line in a plain-text log);

and cuts the result to :data:`MAX_ERROR_CHARS` (500) characters. Secrets and whole texts
are replaced everywhere; shapes and copies are looked for in the first 2,000 characters only,
which is more than a message can keep.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit

from sop_llm.schemas.task import ChatMessage

MAX_ERROR_CHARS: Final = 500
"""The longest error message a provider failure produces (an ellipsis marks a cut)."""
MIN_SECRET_CHARS: Final = 4
"""A shorter "secret" is ignored: replacing every ``ab`` would only garble the message."""
MIN_TEXT_CHARS: Final = 8
ECHO_CHARS: Final = 16

REDACTED: Final = "[redacted]"
REQUEST_TEXT: Final = "[request text]"

_SCAN_CHARS: Final = 4 * MAX_ERROR_CHARS
_ECHO_BUDGET: Final = 200_000
_VALUE: Final = r"[^\s\"',;&)}\]]+(?:;\s*[^\s\"',;&)}\]]+)*"
_NAMED: Final = re.compile(
    r"(?<![A-Za-z0-9_-])"
    r"((?:proxy-)?authorization|x-api-key|api[-_]?key|x-goog-api-key|(?:set-)?cookie"
    r"|x-auth-token|access[-_]?token|refresh[-_]?token|client[-_]?secret|password|secret)"
    r"(\\?[\"']?\s*[:=]\s*\\?[\"']?|[\"']\s*,\s*[\"'])"  # `: `, `=`, `": "`, `', '`
    r"(?!(?:(?:bearer|basic|token)\s+)?\[(?:redacted|request text)\])"  # replaced already
    r"((?:bearer|basic|token)\s+)?" + _VALUE,
    re.IGNORECASE,
)
_SCHEME: Final = re.compile(r"(?<![A-Za-z0-9])(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}", re.I)
_KEY_SHAPED: Final = re.compile(
    r"(?<![A-Za-z0-9])(?:(?:sk|rk|pk|xai)-|gsk_|hf_|AIza)[A-Za-z0-9_*-]{16,}"
)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]+")


class _Request(Protocol):
    """What :meth:`Redaction.for_request` reads of a request (``GenerationRequest``)."""

    @property
    def prompt(self) -> str | None: ...

    @property
    def messages(self) -> Sequence[ChatMessage] | None: ...


@dataclass(frozen=True, slots=True)
class Redaction:
    """What one request's errors must never show: the backend's secrets (its API key) and the
    request's own texts (the prompt, each message). Build it with :meth:`of`."""

    secrets: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()

    @classmethod
    def of(
        cls, *, secrets: Iterable[str | None] = (), texts: Iterable[str | None] = ()
    ) -> Redaction:
        """Keeps the secrets of :data:`MIN_SECRET_CHARS` characters or more and the non-empty
        texts, each also in its JSON-escaped and Python-repr forms (an error may quote them
        as JSON, and SDKs show a body as a Python dict)."""
        kept = {s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}
        return cls(secrets=_longest_first(_forms(kept)), texts=_longest_first(_forms(texts)))

    @classmethod
    def for_request(
        cls, request: _Request, *, key: str | None, base_url: str | None = None
    ) -> Redaction:
        """The redaction of one call: the backend's API key and the password of its base URL
        (``https://user:secret@host``), the request's prompt and every message."""
        texts = [request.prompt, *(m.content for m in request.messages or ())]
        return cls.of(secrets=(key, _password(base_url)), texts=texts)


NO_REDACTION: Final = Redaction()


def sanitize(text: str, redaction: Redaction = NO_REDACTION) -> str:
    """``text`` without credentials, the given secrets or copies of the request's text, free
    of control characters and at most :data:`MAX_ERROR_CHARS` characters long."""
    for secret in redaction.secrets:
        text = text.replace(secret, REDACTED)  # before the cut: no secret is cut in half
    for whole in redaction.texts:
        if len(whole) >= MIN_TEXT_CHARS:
            text = text.replace(whole, REQUEST_TEXT)
    text = text[:_SCAN_CHARS]
    text = _NAMED.sub(_keep_name, text)
    text = _SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _KEY_SHAPED.sub(REDACTED, text)
    text = _without_copies(text, redaction.texts)
    text = _CONTROL.sub(" ", text).strip()
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return text


def _password(url: str | None) -> str | None:
    try:
        return urlsplit(url).password if url else None
    except ValueError:  # a URL the SDK would have refused anyway
        return None


def _keep_name(m: re.Match[str]) -> str:
    return f"{m.group(1)}{m.group(2)}{m.group(3) or ''}{REDACTED}"


def _forms(texts: Iterable[str | None]) -> set[str]:
    out: set[str] = set()
    for t in texts:
        if not t:
            continue
        out.add(t)
        out.add(json.dumps(t)[1:-1])
        out.add(json.dumps(t, ensure_ascii=False)[1:-1])
        out.add(repr(t)[1:-1])  # SDK messages often show the body as a Python dict
    return out


def _longest_first(texts: set[str]) -> tuple[str, ...]:
    # a text that contains another is replaced whole, before the shorter one breaks it up
    return tuple(sorted(texts, key=lambda t: (-len(t), t)))


def _without_copies(text: str, texts: tuple[str, ...]) -> str:
    """``text`` with every stretch copied from one of ``texts`` (``ECHO_CHARS`` or more
    characters) replaced by one :data:`REQUEST_TEXT`.

    Each window of ``text`` goes into a table; each of ``texts`` is walked in steps of
    ``ECHO_CHARS`` (a copy of ``2 * ECHO_CHARS - 1`` characters always holds one such step)
    and each hit is widened to the whole copy, once per alignment. Linear in both lengths for
    ordinary text; a text that repeats itself so much that the work passes
    :data:`_ECHO_BUDGET` steps is withheld whole rather than half-checked."""
    k = ECHO_CHARS
    if len(text) < k or not texts:
        return text
    windows: dict[str, list[int]] = {}
    for i in range(len(text) - k + 1):
        windows.setdefault(text[i : i + k], []).append(i)
    covered = bytearray(len(text))
    budget = _ECHO_BUDGET
    for source in texts:
        reach: dict[int, int] = {}  # alignment (text index - source index) -> end of its copy
        for p in range(0, len(source) - k + 1, k):
            starts = windows.get(source[p : p + k])
            if starts is None:
                continue
            for e in starts:
                shift = e - p
                if e < reach.get(shift, -1):
                    continue  # inside a copy already found at this alignment
                lo, hi = _widen(text, source, e, e + k, shift)
                reach[shift] = hi
                covered[lo:hi] = b"\x01" * (hi - lo)
                budget -= 1 + hi - lo
                if budget < 0:
                    return REQUEST_TEXT
    if not any(covered):
        return text
    return "".join(REQUEST_TEXT if hidden else piece for hidden, piece in _runs(text, covered))


def _widen(text: str, source: str, lo: int, hi: int, shift: int) -> tuple[int, int]:
    """``text[lo:hi]``, equal to ``source[lo - shift:hi - shift]``, widened both ways to the
    whole stretch the two share at that alignment."""
    while lo > max(0, shift) and text[lo - 1] == source[lo - 1 - shift]:
        lo -= 1
    end = min(len(text), len(source) + shift)
    while hi < end and text[hi] == source[hi - shift]:
        hi += 1
    return lo, hi


def _runs(text: str, covered: bytearray) -> list[tuple[bool, str]]:
    """``text`` cut where ``covered`` changes: (covered?, piece) pairs."""
    pieces: list[tuple[bool, str]] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or covered[i] != covered[start]:
            pieces.append((bool(covered[start]), text[start:i]))
            start = i
    return pieces
