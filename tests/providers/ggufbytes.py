"""GGUF files written byte by byte, for tests that need a malformed, hostile or huge-vocabulary
header that ``gguf.GGUFWriter`` would refuse to write (or write slowly). Test-only."""

from __future__ import annotations

import struct
from collections.abc import Sequence

UINT8, INT32, UINT32, FLOAT32, BOOL, STRING, ARRAY, UINT64 = 0, 5, 4, 6, 7, 8, 9, 10
F32 = 0  # ggml tensor type


def u32(n: int) -> bytes:
    return struct.pack("<I", n)


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def text(s: str) -> bytes:
    raw = s.encode()
    return u64(len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    """One key/value: ``payload`` is the value's bytes as the type lays them out."""
    return text(key) + u32(vtype) + payload


def kv_u32(key: str, n: int) -> bytes:
    return kv(key, UINT32, u32(n))


def kv_str(key: str, s: str) -> bytes:
    return kv(key, STRING, text(s))


def kv_array(key: str, elem: int, items: Sequence[bytes]) -> bytes:
    return kv(key, ARRAY, u32(elem) + u64(len(items)) + b"".join(items))


def tensor(name: str, dims: Sequence[int], *, ggml_type: int = F32, offset: int = 0) -> bytes:
    return (
        text(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)
    )


def llama_kvs(*, arch: str = "llama", layers: int = 2, embd: int = 64, heads: int = 4) -> bytes:
    """The key/values a shape needs (4 of them)."""
    return (
        kv_str("general.architecture", arch)
        + kv_u32(f"{arch}.block_count", layers)
        + kv_u32(f"{arch}.embedding_length", embd)
        + kv_u32(f"{arch}.attention.head_count", heads)
    )


def gguf(
    kvs: bytes = b"",
    n_kv: int | None = None,
    *,
    tensors: Sequence[bytes] = (),
    n_tensors: int | None = None,
    data: bytes = b"",
    version: int = 3,
    magic: bytes = b"GGUF",
    alignment: int = 32,
) -> bytes:
    """A whole file: the header, ``kvs`` (``n_kv`` key/values: say how many, or lie), the tensor
    infos (``n_tensors`` of them, by default as many as given), padding, ``data``."""
    head = (
        magic
        + u32(version)
        + u64(len(tensors) if n_tensors is None else n_tensors)
        + u64(0 if n_kv is None else n_kv)
        + kvs
        + b"".join(tensors)
    )
    if tensors:
        head += b"\0" * (-len(head) % alignment)
    return head + data


def model(*, kvs: bytes = b"", n_kv: int = 0, floats: int = 16, alignment: int = 32) -> bytes:
    """A valid little model: the llama shape keys plus ``kvs`` (``n_kv`` of them), and one f32
    tensor of ``floats`` elements whose data ends the file (aligned to ``alignment``, which a
    ``general.alignment`` in ``kvs`` must match)."""
    return gguf(
        llama_kvs() + kvs,
        4 + n_kv,
        tensors=[tensor("output_norm.weight", [floats])],
        data=b"\0" * (4 * floats),
        alignment=alignment,
    )
