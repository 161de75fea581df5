"""Chat prompts of a llama.cpp model: its chat template, and the tokens that end a turn
(and :func:`unmatchable_token`: the special tokens a GBNF grammar must not require).

The template is the model spec's ``chat_template`` when it sets one (an override), else the
GGUF file's ``tokenizer.chat_template``. A model with neither runs plain prompts only: a chat
task (``messages``) fails with ``bad_request`` naming the setting, and is never given an
invented format.

Generation stops at any end-of-generation token llama.cpp knows (EOS, EOT), at every
end-of-turn token the vocabulary has (``<end_of_turn>``, ``<|im_end|>``, ``<|eot_id|>``, ...),
at the stops the template's formatter declares, and at the token the template itself writes
after an assistant turn (found by rendering a probe conversation once, at load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jinja2
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from sop_llm.providers.base import GenerationRequest
from sop_llm.providers.errors import BadRequestError
from sop_llm.providers.sanitize import Redaction

# texts of the end-of-turn tokens of the common chat formats (Gemma, ChatML, Llama 3, Phi-3,
# Command-R); each counts where the vocabulary has it as one token
END_OF_TURN_TEXTS = (
    "<end_of_turn>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|END_OF_TURN_TOKEN|>",
)

# a conversation rendered once at load to see what the template writes after a model's turn
_PROBE_ASSISTANT = "sop-probe-assistant"
_PROBE: list[Any] = [
    {"role": "user", "content": "sop-probe-user"},
    {"role": "assistant", "content": _PROBE_ASSISTANT},
    {"role": "user", "content": "sop-probe-user"},
]


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """What a loaded model's chat template gives: the formatter (``None``: no template), the
    BOS token's text, and where generation stops."""

    formatter: Jinja2ChatFormatter | None
    bos_text: str
    stop_ids: frozenset[int]
    # stops the formatter declares that are not one token of the vocabulary
    stop_texts: tuple[str, ...] = ()
    # why there is no formatter although a template was found (it does not compile)
    problem: str | None = None


def token_text(llm: llama_cpp.Llama, token: int) -> str:
    return llm._model.token_get_text(token) if token >= 0 else ""


def single_token(llm: llama_cpp.Llama, text: str) -> int | None:
    """The token that is ``text`` as a whole (special tokens included), if there is one."""
    if not text:
        return None
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    except RuntimeError:
        return None
    if len(ids) != 1 or token_text(llm, ids[0]) != text:
        return None
    return int(ids[0])


def chat_format(llm: llama_cpp.Llama, spec_template: str | None) -> ChatFormat:
    """The chat format of a freshly loaded model (blocking; in the model's thread)."""
    template = spec_template or llm.metadata.get("tokenizer.chat_template") or None
    eos, bos = llm.token_eos(), llm.token_bos()
    bos_text = token_text(llm, bos)
    vocab = llm._model.vocab
    stop_ids = {t for t in (eos, llama_cpp.llama_vocab_eot(vocab)) if t >= 0}
    for text in END_OF_TURN_TEXTS:
        token = single_token(llm, text)
        if token is not None:
            stop_ids.add(token)
    if template is None:
        return ChatFormat(formatter=None, bos_text=bos_text, stop_ids=frozenset(stop_ids))
    try:
        formatter = Jinja2ChatFormatter(
            template=template, eos_token=token_text(llm, eos), bos_token=bos_text
        )
    except jinja2.TemplateError as exc:  # a syntax error, an unknown tag or filter
        source = "the model spec's chat_template" if spec_template else "the file's template"
        return ChatFormat(
            formatter=None,
            bos_text=bos_text,
            stop_ids=frozenset(stop_ids),
            problem=f"{source} does not compile ({exc})",
        )
    stop_texts: list[str] = []
    try:
        probe = formatter(messages=_PROBE)
    except Exception:  # noqa: BLE001 - a template that refuses the probe declares nothing
        probe = None
    if probe is not None:
        declared = [probe.stop] if isinstance(probe.stop, str) else list(probe.stop or ())
        for text in declared:
            token = single_token(llm, text)
            if token is not None:
                stop_ids.add(token)
            elif text and text not in stop_texts:
                stop_texts.append(text)
        turn_end = _turn_end_token(llm, probe.prompt)
        if turn_end is not None:
            stop_ids.add(turn_end)
    return ChatFormat(
        formatter=formatter,
        bos_text=bos_text,
        stop_ids=frozenset(stop_ids),
        stop_texts=tuple(stop_texts),
    )


def _turn_end_token(llm: llama_cpp.Llama, rendered: str) -> int | None:
    """The control token the template writes right after an assistant's message, if any."""
    at = rendered.find(_PROBE_ASSISTANT)
    if at < 0:
        return None
    after = rendered[at + len(_PROBE_ASSISTANT) :].lstrip(" ")
    tokens = llm.tokenize(after.encode(), add_bos=False, special=True)[:1]
    if tokens and llama_cpp.llama_vocab_is_control(llm._model.vocab, tokens[0]):
        return int(tokens[0])
    return None


def render_chat(fmt: ChatFormat, name: str, request: GenerationRequest) -> str:
    """The prompt text of a chat request. Raises :class:`BadRequestError` when the model has
    no chat template or the template refuses the conversation."""
    if fmt.formatter is None and fmt.problem is not None:
        raise BadRequestError(
            f"model {name!r} has no usable chat template: {fmt.problem}; fix chat_template "
            "in the model spec to run chat tasks (messages), or send a prompt"
        )
    if fmt.formatter is None:
        raise BadRequestError(
            f"model {name!r} has no chat template: its GGUF file has no "
            "tokenizer.chat_template and its model spec sets no chat_template; set "
            "chat_template in the model spec to run chat tasks (messages), or send a prompt"
        )
    messages: list[Any] = [{"role": m.role, "content": m.content} for m in request.messages or ()]
    try:
        return str(fmt.formatter(messages=messages).prompt)
    except Exception as exc:  # a template's raise_exception(), a Jinja error
        # a template's own message may quote the conversation
        raise BadRequestError(
            f"{name}: chat template failed: {exc}",
            redaction=Redaction.for_request(request, key=None),
        ) from exc


def unmatchable_token(llm: llama_cpp.Llama, gbnf: str) -> str | None:
    """A token reference of ``gbnf`` (``<[id]>``, ``<name>``; a grammar llama.cpp parsed)
    that no token can satisfy: an end-of-generation token (llama.cpp allows those only where
    the grammar is complete) or an id outside the vocabulary. llama.cpp aborts the whole
    process when its grammar leaves no token to pick, so such a grammar is refused first."""
    vocab = llm._model.vocab
    i, n = 0, len(gbnf)
    while i < n:
        c = gbnf[i]
        if c == "#":  # a comment, to the end of the line
            i = gbnf.find("\n", i)
            i = n if i < 0 else i
        elif c in '"[':  # a literal or a character class, with backslash escapes
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and gbnf[i] != close:
                i += 2 if gbnf[i] == "\\" else 1
        elif c == "<":
            end = gbnf.find(">", i)
            end = n if end < 0 else end
            ref = gbnf[i : end + 1]
            negated = gbnf[i - 1 : i] == "!"  # "any token but this one" is satisfiable
            if ref.startswith("<[") and ref.endswith("]>") and ref[2:-2].isdigit():
                ids = [int(ref[2:-2])]
            else:  # llama.cpp takes the one token the text is
                ids = llm.tokenize(ref.encode(), add_bos=False, special=True)
            bad = len(ids) == 1 and (
                ids[0] >= llm.n_vocab() or llama_cpp.llama_vocab_is_eog(vocab, ids[0])
            )
            if bad and not negated:
                return ref
            i = end
        i += 1
    return None
