"""The GGUF header reader: the same shapes as ``gguf.GGUFReader`` reads, fast on a big vocabulary,
and a clear :class:`GgufError` naming the file for every malformed, truncated or hostile one."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sop_llm.providers.gguf_shape import (
    _TENSOR_TYPES,
    GgufError,
    GgufShape,
    estimate_bytes,
    read_shape,
)
from tests.conftest import ROOT
from tests.providers import ggufbytes as gb


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_the_tiny_model_s_shape(tiny_gguf: Path) -> None:
    shape = read_shape(str(tiny_gguf))
    assert shape == GgufShape(file_bytes=tiny_gguf.stat().st_size, n_layers=2, n_embd_kv=64)


def test_the_shape_is_the_one_gguf_s_own_reader_gives(tmp_path: Path) -> None:
    """Per-layer arrays (the largest counts), explicit key and value widths, and the
    vocabulary arrays and strings skipped on the way, as ``gguf.GGUFReader`` reads them."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "gqa.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(3)
    w.add_embedding_length(640)
    w.add_head_count(4)
    w.add_head_count_kv([1, 2, 1])
    w.add_key_length(256)
    w.add_value_length(128)
    w.add_token_list(["<pad>", "<eos>", "▁a", "b" * 300])
    w.add_token_scores([0.0, 0.0, -1.0, -2.0])
    w.add_chat_template("{{ messages }}")
    w.add_array("sop.nested.floats", [1.5, 2.5])
    w.add_tensor("output_norm.weight", np.ones(640, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fields = gguf.GGUFReader(str(path)).fields
    assert max(fields["gemma3.attention.head_count_kv"].contents()) == 2
    # (256 + 128) * 2 heads / 2
    assert read_shape(str(path)) == GgufShape(path.stat().st_size, n_layers=3, n_embd_kv=384)


def test_the_tensor_sizes_are_ggml_s() -> None:
    gguf = pytest.importorskip("gguf")
    for type_id, block in _TENSOR_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == block, type_id


def test_a_vocabulary_of_262144_strings_is_skipped_in_milliseconds(tmp_path: Path) -> None:
    """Gemma 3's vocabulary size; ``gguf.GGUFReader`` took about 13 s over such a header."""
    n = 262_144
    tokens = [gb.text(f"tok{i}") for i in range(n)]
    vocab = (
        gb.kv_array("tokenizer.ggml.tokens", gb.STRING, tokens)
        + gb.kv_array("tokenizer.ggml.scores", gb.FLOAT32, [b"\0\0\0\0"] * n)
        + gb.kv_array("tokenizer.ggml.merges", gb.STRING, tokens)
    )
    path = write(tmp_path, gb.model(kvs=vocab, n_kv=3))
    started = time.perf_counter()
    assert read_shape(path).n_layers == 2
    assert time.perf_counter() - started < 1.5  # about 0.08 s on an idle 2-core machine


def test_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_shape(str(tmp_path / "missing.gguf"))


def test_a_directory_or_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer
    for path in (tmp_path, fifo):
        with pytest.raises(GgufError, match="not a regular file"):
            read_shape(str(path))


BAD_FILES: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "too short"),
    "not gguf": (b"PK\x03\x04" + b"\0" * 60, "not a GGUF file"),
    "version 1": (gb.gguf(version=1) + b"\0" * 8, "unsupported GGUF version 1"),
    "big-endian": (gb.gguf(version=3 << 24) + b"\0" * 8, "big-endian"),
    "absurd kv count": (
        gb.gguf(n_kv=2**63) + b"\0" * 64,
        "key/value count 9223372036854775808 cannot fit",
    ),
    "absurd tensor count": (
        gb.gguf(gb.llama_kvs(), 4, n_tensors=2**64 - 1),
        "tensor count 18446744073709551615 cannot fit",
    ),
    "absurd key length": (gb.gguf(gb.u64(2**40) + b"k" * 64, 1), "absurd length"),
    "key past the end": (gb.gguf(gb.u64(500) + b"k" * 64, 1), "truncated: key 0"),
    "unknown value type": (gb.gguf(gb.kv("x", 13, b"\0" * 8), 1), "unknown value type 13"),
    "array of arrays": (
        gb.gguf(gb.kv("x", gb.ARRAY, gb.u32(gb.ARRAY) + gb.u64(1) + b"\0" * 12), 1),
        "an array of arrays",
    ),
    "unknown element type": (
        gb.gguf(gb.kv("x", gb.ARRAY, gb.u32(99) + gb.u64(1) + b"\0" * 8), 1),
        "unknown element type 99",
    ),
    "absurd string array": (
        gb.gguf(gb.kv("x", gb.ARRAY, gb.u32(gb.STRING) + gb.u64(2**62) + b"\0" * 64), 1),
        "element count of the array 'x' 4611686018427387904 cannot fit",
    ),
    "absurd number array": (
        gb.gguf(gb.kv("x", gb.ARRAY, gb.u32(gb.UINT64) + gb.u64(2**61) + b"\0" * 64), 1),
        "element count of the array 'x' 2305843009213693952 cannot fit",
    ),
    "string element past the end": (
        gb.gguf(gb.kv_array("x", gb.STRING, [gb.text("a"), gb.u64(2**64 - 1)]), 1),
        "truncated: the array 'x'",
    ),
    "string value past the end": (
        gb.gguf(gb.kv("general.name", gb.STRING, gb.u64(1 << 30) + b"x" * 16), 1),
        "truncated: the value of 'general.name'",
    ),
    "duplicate key": (gb.gguf(gb.kv_u32("a", 1) + gb.kv_u32("a", 2), 2), "duplicate key 'a'"),
    "alignment not a power of two": (
        gb.model(kvs=gb.kv_u32("general.alignment", 24), n_kv=1),
        "not a power of two",
    ),
    "alignment not uint32": (
        gb.model(kvs=gb.kv("general.alignment", gb.UINT64, gb.u64(32)), n_kv=1),
        "not uint32",
    ),
    "five dimensions": (
        gb.gguf(gb.llama_kvs(), 4, tensors=[gb.tensor("t", [1, 1, 1, 1, 1])], data=b"\0" * 4),
        "5 dimensions",
    ),
    "tensor data cut short": (gb.model()[:-1], "truncated: the tensor data ends at byte"),
    "tensor offset past the end": (
        gb.gguf(gb.llama_kvs(), 4, tensors=[gb.tensor("t", [4], offset=1 << 40)], data=b"\0" * 16),
        "truncated: the tensor data ends at byte",
    ),
    "no shape keys": (gb.gguf(gb.kv_str("general.architecture", "llama"), 1), "lacks block_count"),
    "zero heads": (
        gb.gguf(gb.llama_kvs(heads=0), 4),
        "lacks block_count, embedding_length or heads",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_bad_file_is_a_clear_error_naming_it(tmp_path: Path, case: str) -> None:
    data, problem = BAD_FILES[case]
    path = write(tmp_path, data)
    with pytest.raises(GgufError, match=problem) as info:
        read_shape(path)
    assert str(info.value).startswith(f"{path}: ")
    assert isinstance(info.value, ValueError)


def test_the_hand_written_model_is_valid(tmp_path: Path) -> None:
    """The base of the bad files above reads, so each of them fails for its own reason."""
    path = write(tmp_path, gb.model(kvs=gb.kv_u32("general.alignment", 64), n_kv=1, alignment=64))
    assert read_shape(path) == GgufShape(os.path.getsize(path), n_layers=2, n_embd_kv=64)


def test_every_truncation_of_a_real_file_is_reported(tiny_gguf: Path, tmp_path: Path) -> None:
    data = tiny_gguf.read_bytes()
    cuts = [*range(0, 64), *range(64, 24_000, 7), *range(len(data) - 40, len(data))]
    for cut in cuts:
        path = write(tmp_path, data[:cut])
        with pytest.raises(GgufError, match=r"truncated|too short"):
            read_shape(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2_000), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_a_corrupted_header_reads_or_is_refused(flips: list[tuple[int, int]]) -> None:
    """Random bytes written over a header: a shape or a :class:`GgufError`, nothing else."""
    vocab = gb.kv_array("tokenizer.ggml.tokens", gb.STRING, [gb.text("ab")] * 50)
    data = bytearray(gb.model(kvs=vocab + gb.kv_u32("general.alignment", 32), n_kv=2))
    for at, byte in flips:
        data[at % len(data)] = byte
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), bytes(data))
        try:
            shape = read_shape(path)
        except GgufError:
            return
        assert shape.n_layers > 0 and shape.file_bytes == len(data)


def test_the_estimate_offloads_a_share_of_the_layers() -> None:
    shape = GgufShape(file_bytes=1000, n_layers=4, n_embd_kv=8)
    assert estimate_bytes(shape, n_gpu_layers=0, n_ctx=16) == 0
    assert estimate_bytes(shape, n_gpu_layers=2, n_ctx=16) == 500 + 2 * 16 * 8 * 2 * 2
    assert estimate_bytes(shape, n_gpu_layers=-1, n_ctx=16) == 1000 + 2 * 16 * 8 * 2 * 4


def test_the_local_provider_needs_no_gguf_package(tiny_gguf: Path) -> None:
    """``pip install "sop-llm[local]"`` has no ``gguf`` (only the test extra does): the provider
    imports, and builds a model from its header, with ``import gguf`` failing."""
    pytest.importorskip("llama_cpp")
    script = (
        "import sys; sys.modules['gguf'] = None\n"
        "from providers.factory import build_provider\n"
        "from schemas.models import ModelSpec\n"
        f"spec = ModelSpec(name='t', provider='llama_cpp', path={str(tiny_gguf)!r})\n"
        "build_provider(spec, env={})\n"
        "import providers.llama_cpp, ops.app\n"
        "assert sys.modules['gguf'] is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
