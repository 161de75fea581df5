"""Operations: settings, the composition root, the sidecar, the CLI and logging."""

from sop_llm.ops.settings import Settings

__all__ = ["Settings"]
