"""What a GGUF file's header says about a model's size: enough to estimate its device memory."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import gguf


@dataclass(frozen=True, slots=True)
class GgufShape:
    """What the GGUF header says about a model's size: enough to estimate its device memory."""

    file_bytes: int
    n_layers: int
    n_embd_kv: int  # width of K (and of V) per layer and token, grouped-query attention included


def read_shape(path: str) -> GgufShape:
    """The header of the GGUF file at ``path`` (no tensor data is read). Raises ``OSError``
    for a missing file and ``ValueError`` for one that is not a GGUF model."""
    size = os.path.getsize(path)
    try:
        fields = gguf.GGUFReader(path).fields
    except (IndexError, KeyError, TypeError) as exc:  # a truncated or malformed header
        raise ValueError(f"{path}: not a readable GGUF file: {exc}") from exc

    def value(key: str) -> int | None:
        field = fields.get(key)
        if field is None:
            return None
        got = field.contents()
        if isinstance(got, list):  # per-layer values (some architectures): the largest
            got = max(got) if got else None
        return int(got) if isinstance(got, int | float) else None

    arch_field = fields.get("general.architecture")
    arch = str(arch_field.contents()) if arch_field is not None else ""
    n_layers = value(f"{arch}.block_count")
    n_embd = value(f"{arch}.embedding_length")
    n_head = value(f"{arch}.attention.head_count")
    if not n_layers or not n_embd or not n_head:
        raise ValueError(f"{path}: the GGUF header lacks block_count, embedding_length or heads")
    n_head_kv = value(f"{arch}.attention.head_count_kv") or n_head
    k = value(f"{arch}.attention.key_length") or n_embd // n_head
    v = value(f"{arch}.attention.value_length") or n_embd // n_head
    return GgufShape(file_bytes=size, n_layers=n_layers, n_embd_kv=(k + v) * n_head_kv // 2)


def estimate_bytes(shape: GgufShape, *, n_gpu_layers: int, n_ctx: int) -> int:
    """Device memory of the offloaded share of the model: its weights plus an f16 KV cache
    (``2 * n_ctx * n_embd_kv * 2 bytes`` per offloaded layer); 0 with no layer offloaded.
    Compute buffers are not counted (the admission reserve covers them). Mirrors
    ``gpu.admission.estimate_need``, which providers may not import."""
    if n_gpu_layers == 0:
        return 0
    layers = shape.n_layers if n_gpu_layers < 0 else min(n_gpu_layers, shape.n_layers)
    weights = shape.file_bytes * layers / shape.n_layers
    kv = 2 * n_ctx * shape.n_embd_kv * 2 * layers
    return math.ceil(weights + kv)
