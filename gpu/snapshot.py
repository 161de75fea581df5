"""What the sidecar serves at ``GET /v1/gpu``: devices, memory, loaded models, slots."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict
from typing import Final

from redis.exceptions import RedisError

from sop_llm.gpu.admission import Admission, LoadedModel
from sop_llm.gpu.nvml import Described, MemoryReader
from sop_llm.gpu.semaphore import TRANSIENT_ERRORS, GpuSemaphore
from sop_llm.schemas.errors import SopError

Json = dict[str, object]
# passing trouble or a refusal: either way a part the picture names, and the snapshot goes on
_UNREADABLE: Final[tuple[type[BaseException], ...]] = (*TRANSIENT_ERRORS, RedisError)


def _model(m: LoadedModel) -> Json:
    return {
        "model": m.model,
        "device": m.device,
        "need_bytes": m.need_bytes,
        "in_use": m.in_use,
        "idle_s": round(m.idle_s, 3),
    }


async def gpu_snapshot(
    *,
    reader: MemoryReader,
    admission: Admission | None = None,
    semaphores: Sequence[GpuSemaphore] = (),
    timeout_s: float = 2.0,
) -> Json:
    """A JSON-ready picture of this host's GPUs. Never raises for a part it cannot read: that
    part is left empty and named in ``errors``.

    ``status``: ``"ok"``, or why there is no GPU (``"no GPU: ..."``). ``devices``: memory
    (bytes), utilisation (percent) and temperature (Celsius) per device. ``models``: the models
    this process loaded, with their device index (``null``: the CPU), estimated need, current
    users and idle seconds. ``semaphores``: per device, its permits, the holders (with the time
    left on their lease) and the waiters in the order they will be served.
    """
    errors: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            devices = await reader.read()
    except (TimeoutError, OSError, SopError) as exc:
        devices = []
        errors.append(f"memory: {exc!r}")
    status = reader.status if isinstance(reader, Described) else "ok"
    if not devices and status == "ok" and not errors:
        status = "no GPU"
    models = admission.loaded() if admission is not None else []
    slots: list[Json] = []
    for sem in semaphores:
        try:
            state = await sem.inspect()
        except _UNREADABLE as exc:
            errors.append(f"semaphore {sem.device}: {type(exc).__name__}: {exc}")
            continue
        slots.append(
            {
                "device": str(state.device),
                "host": state.device.host,
                "index": state.device.index,
                "permits": state.permits,
                "holders": [asdict(h) for h in state.holders],
                "waiters": [asdict(w) for w in state.waiters],
            }
        )
    return {
        "status": status,
        "devices": [asdict(d) for d in devices],
        "models": [_model(m) for m in models],
        "semaphores": slots,
        "errors": errors,
    }
