"""Write a tiny LLaMA-architecture GGUF model: random weights, a real SPM tokenizer.

Two layers, n_embd 64, an SPM vocabulary with the 256 ``<0xNN>`` byte-fallback tokens (so any
UTF-8 text tokenizes), ChatML control tokens and a ``tokenizer.chat_template``. About 650 KB;
llama.cpp loads it in milliseconds. Its output is noise, but real noise: every code path of
the llama.cpp adapter (tokenizing, templating, sampling, grammars, seeds, cancellation) runs
for real. Test-only: nothing at run time imports it.

    python -m tests.providers.tinygguf /tmp/tiny.gguf
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

import gguf
import numpy as np

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
N_CTX = 32768

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# pieces beyond single characters: JSON punctuation and a few words, so the tokenizer merges
_PIECES = [
    '{"', '":', '",', '"}', '":"', "true", "false", "null", "name", "age", "tags", "▁the",
    "▁a", "▁is", "▁of", "▁and", "▁to", "▁in", "▁JSON", "▁Hello", "▁world", "er", "in", "on",
    "an", "re", "▁", "\\n", "\\u",
]  # fmt: skip


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    scores = [0.0] * len(tokens)
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf.TokenType.BYTE)
        scores.append(0.0)
    singles = [c for c in string.printable if c not in " \t\n\r\x0b\x0c"] + ["▁"]
    for i, piece in enumerate(dict.fromkeys(singles + _PIECES)):
        tokens.append(piece)
        types.append(gguf.TokenType.NORMAL)
        # SPM merges by score: longer pieces win
        scores.append(-1000.0 + len(piece) * 10 - i * 0.001)
    return tokens, scores, [int(t) for t in types]


def write_tiny_gguf(path: str | Path, *, seed: int = 1234) -> Path:
    """Write the model to ``path`` and return it."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("sop-llm tiny test model")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(4)  # <|im_end|> ends a turn, as in ChatML models
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.5).astype(np.float32)

    w.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", weight(N_EMBD, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weight(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weight(N_FF, N_EMBD))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weight(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", weight(n_vocab, N_EMBD))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    out = write_tiny_gguf(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")
    sys.stdout.write(f"{out} ({out.stat().st_size} bytes)\n")
