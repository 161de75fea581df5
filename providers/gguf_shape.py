"""What a GGUF file's header says about a model's size: enough to estimate its device memory.

A reader of our own for the GGUF header (versions 2 and 3, little-endian): the magic, the
counts, the metadata key/values and the tensor infos; no tensor data is read. Array values are
skipped without being built (a vocabulary is one: 262,144 strings for Gemma 3), except the few
small numeric ones that describe a model's shape per layer, so reading a header takes
milliseconds where ``gguf.GGUFReader`` takes seconds. Every count and length is checked against
the bytes left in the file before it is used: a hostile or truncated file raises
:class:`GgufError`, never hangs or allocates what it claims.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["GgufError", "GgufShape", "estimate_bytes", "read_shape"]

_MAGIC: Final = b"GGUF"
_VERSIONS: Final = (2, 3)
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")
# value type id -> its layout; 8 (string) and 9 (array) have their own
_SCALARS: Final[dict[int, struct.Struct]] = {
    0: struct.Struct("<B"),  # uint8
    1: struct.Struct("<b"),  # int8
    2: struct.Struct("<H"),  # uint16
    3: struct.Struct("<h"),  # int16
    4: _U32,  # uint32
    5: struct.Struct("<i"),  # int32
    6: struct.Struct("<f"),  # float32
    7: struct.Struct("<?"),  # bool
    10: _U64,  # uint64
    11: struct.Struct("<q"),  # int64
    12: struct.Struct("<d"),  # float64
}
_STRING: Final = 8
_ARRAY: Final = 9
_MAX_NAME: Final = 1 << 16  # a key or tensor name longer than this is not a GGUF file
_MAX_DIMS: Final = 4  # GGML_MAX_DIMS: llama.cpp refuses more
_KEPT_STRINGS: Final = frozenset({"general.architecture"})
_KEPT_STRING_BYTES: Final = 4096
# keys ({arch}.<suffix>) whose per-layer arrays are built: small numeric arrays only
_SHAPE_SUFFIXES: Final = (
    ".block_count",
    ".embedding_length",
    ".attention.head_count",
    ".attention.head_count_kv",
    ".attention.key_length",
    ".attention.value_length",
)
_KEPT_ARRAY_LEN: Final = 1 << 16
# ggml tensor type id -> (elements per block, bytes per block), as ggml.c has them; a type not
# listed (a newer ggml's, or Q8_1, 9, which no file stores) only bounds the data from below
_TENSOR_TYPES: Final[dict[int, tuple[int, int]]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
    39: (32, 17), 40: (64, 36), 41: (128, 18),
}  # fmt: skip

Value = int | float | bool | str | list[int | float | bool]


class GgufError(ValueError):
    """A file that is not a readable GGUF model; the message names the file and the problem."""


@dataclass(frozen=True, slots=True)
class GgufShape:
    """What the GGUF header says about a model's size: enough to estimate its device memory."""

    file_bytes: int
    n_layers: int
    n_embd_kv: int  # width of K (and of V) per layer and token, grouped-query attention included


class _Header:
    """One pass over a GGUF header held in ``buf`` (the whole file, memory-mapped)."""

    def __init__(self, path: str, buf: mmap.mmap, size: int) -> None:
        self.path = path
        self.buf = buf
        self.size = size
        self.pos = 0
        self.values: dict[str, Value] = {}
        self.keys: set[str] = set()

    def error(self, problem: str) -> GgufError:
        return GgufError(f"{self.path}: {problem}")

    def truncated(self, what: str) -> GgufError:
        return self.error(f"truncated: {what} at byte {self.pos} runs past the end of the file")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(what)

    def scalar(self, layout: struct.Struct, what: str) -> int | float | bool:
        self.need(layout.size, what)
        got: int | float | bool = layout.unpack_from(self.buf, self.pos)[0]
        self.pos += layout.size
        return got

    def u32(self, what: str) -> int:
        return int(self.scalar(_U32, what))

    def u64(self, what: str) -> int:
        return int(self.scalar(_U64, what))

    def count(self, what: str, *, min_bytes: int) -> int:
        """A uint64 count of items of at least ``min_bytes`` each; refused when they could not
        fit in the rest of the file."""
        n = self.u64(what)
        left = self.size - self.pos
        if n * min_bytes > left:
            raise self.error(
                f"truncated or corrupt: {what} {n} cannot fit in the {left} bytes left after "
                f"byte {self.pos}"
            )
        return n

    def name(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if n > _MAX_NAME:
            raise self.error(f"absurd length {n} of {what} at byte {self.pos - 8}")
        self.need(n, what)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def string(self, what: str, *, keep: bool) -> str | None:
        n = self.u64(f"the length of {what}")
        self.need(n, what)
        start, self.pos = self.pos, self.pos + n
        if not keep or n > _KEPT_STRING_BYTES:
            return None
        return self.buf[start : self.pos].decode("utf-8", errors="replace")

    def skip_strings(self, n: int, what: str) -> None:
        # the hot loop of a vocabulary: lengths read in place, nothing built
        unpack, buf, pos = _U64.unpack_from, self.buf, self.pos
        try:
            for _ in range(n):
                pos += 8 + unpack(buf, pos)[0]
        except (struct.error, OverflowError):
            pos = self.size + 1
        if pos > self.size:
            raise self.truncated(what)
        self.pos = pos

    def array(self, key: str, *, keep: bool) -> list[int | float | bool] | None:
        what = f"the array {key!r}"
        elem = self.u32(f"the element type of {what}")
        if elem == _STRING:
            self.skip_strings(self.count(f"element count of {what}", min_bytes=8), what)
            return None
        layout = _SCALARS.get(elem)
        if layout is None:
            kind = "an array of arrays" if elem == _ARRAY else f"unknown element type {elem}"
            raise self.error(f"{what} is {kind}")
        n = self.count(f"element count of {what}", min_bytes=layout.size)
        start, self.pos = self.pos, self.pos + n * layout.size
        if not keep or n > _KEPT_ARRAY_LEN:
            return None
        fmt = struct.Struct(f"<{n}{layout.format[-1]}")
        return list(fmt.unpack_from(self.buf, start))

    def kv(self, index: int) -> None:
        key = self.name(f"key {index}")
        if key in self.keys:
            raise self.error(f"duplicate key {key!r}")
        self.keys.add(key)
        vtype = self.u32(f"the type of {key!r}")
        if key == "general.alignment" and vtype != 4:
            raise self.error(f"general.alignment has value type {vtype}, not uint32 (4)")
        got: Value | None
        if vtype == _STRING:
            got = self.string(f"the value of {key!r}", keep=key in _KEPT_STRINGS)
        elif vtype == _ARRAY:
            got = self.array(key, keep=key.endswith(_SHAPE_SUFFIXES))
        elif vtype in _SCALARS:
            got = self.scalar(_SCALARS[vtype], f"the value of {key!r}")
        else:
            raise self.error(f"key {key!r} has unknown value type {vtype}")
        if got is not None:
            self.values[key] = got

    def tensor_end(self, index: int) -> int:
        """The end of tensor ``index``'s data, relative to the data section."""
        name = self.name(f"the name of tensor {index}")
        n_dims = self.u32(f"the dimension count of tensor {name!r}")
        if n_dims > _MAX_DIMS:
            raise self.error(f"tensor {name!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
        elements = 1
        for _ in range(n_dims):
            elements *= self.u64(f"a dimension of tensor {name!r}")
        ggml_type = self.u32(f"the type of tensor {name!r}")
        offset = self.u64(f"the offset of tensor {name!r}")
        block = _TENSOR_TYPES.get(ggml_type)
        if block is None:  # unknown here: its data starts in the file at least
            return offset
        per_block, block_bytes = block
        return offset + -(-elements // per_block) * block_bytes

    def read(self) -> None:
        self.need(4, "the magic")
        magic = self.buf[0:4]
        self.pos = 4
        if magic != _MAGIC:
            raise self.error(f"not a GGUF file (it starts with {magic!r}, not {_MAGIC!r})")
        version = self.u32("the version")
        if version not in _VERSIONS:
            if version & 0xFFFF == 0 and version >> 16:
                raise self.error("a big-endian GGUF file (llama.cpp reads little-endian ones)")
            raise self.error(f"unsupported GGUF version {version} (2 and 3 are read)")
        n_tensors = self.count("tensor count", min_bytes=24)
        n_kv = self.count("key/value count", min_bytes=13)
        for i in range(n_kv):
            self.kv(i)
        alignment = self.values.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise self.error(f"general.alignment {alignment!r} is not a power of two")
        data_end = 0
        for i in range(n_tensors):
            data_end = max(data_end, self.tensor_end(i))
        data_start = -(-self.pos // alignment) * alignment
        if n_tensors and data_start + data_end > self.size:
            raise self.error(
                f"truncated: the tensor data ends at byte {data_start + data_end}, "
                f"the file has {self.size} bytes"
            )


def _read_header(path: str) -> tuple[dict[str, Value], int]:
    """The kept values of the GGUF header at ``path`` (every scalar, ``general.architecture``
    and the per-layer shape arrays), checked through to the end of its tensor infos and the
    file's length against them, and the file's size in bytes."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open below
        raise GgufError(f"{path}: not a regular file")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:  # magic, version and the two counts
            raise GgufError(f"{path}: not a GGUF file ({size} bytes, too short for a header)")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            header = _Header(path, buf, size)
            header.read()
    return header.values, size


def read_shape(path: str) -> GgufShape:
    """The shape of the GGUF model at ``path`` from its header (no tensor data is read).
    Raises ``OSError`` for a missing file and :class:`GgufError` (a ``ValueError``) for one
    that is not a readable GGUF model."""
    values, size = _read_header(path)

    def value(key: str) -> int | None:
        got = values.get(key)
        if isinstance(got, list):  # per-layer values (some architectures): the largest
            got = max(got) if got else None
        return int(got) if isinstance(got, int | float) else None

    arch = str(values.get("general.architecture", ""))
    n_layers = value(f"{arch}.block_count")
    n_embd = value(f"{arch}.embedding_length")
    n_head = value(f"{arch}.attention.head_count")
    if not n_layers or not n_embd or not n_head:
        raise GgufError(f"{path}: the GGUF header lacks block_count, embedding_length or heads")
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
