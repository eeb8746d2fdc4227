"""OverFill: the full model prefills, a pruned copy of it decodes from the same KV cache."""
from .errors import OverfillError

__version__ = "0.1.0"

_LAZY = {
    "TwoStageModel": "overfill.two_stage",
    "TwoStageConfig": "overfill.two_stage",
    "check_compatible": "overfill.two_stage",
    "SamplingParams": "overfill.engine",
    "BatchDecoder": "overfill.engine",
    "ContinuousBatcher": "overfill.engine",
    "generate": "overfill.generate",
    "stream": "overfill.generate",
    "load_model": "overfill.model",
    "Transformer": "overfill.model",
    "ModelArgs": "overfill.model",
    "KVCache": "overfill.kv_cache",
}


def __getattr__(name: str):
    # Keep `import overfill` (and `overfill --help`) free of torch until something needs it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'overfill' has no attribute {name!r}")


__all__ = ["OverfillError", *_LAZY]
