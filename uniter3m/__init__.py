"""uniter3m: one transformer over text, face and speech for emotion recognition.

Heavy submodules (torch models) are imported lazily so `uniter3m --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "EmotionClassifier": "uniter3m.train.predict",
    "UniterModel": "uniter3m.model.uniter",
    "UniterConfig": "uniter3m.model.config",
}

if TYPE_CHECKING:  # pragma: no cover
    from uniter3m.model.config import UniterConfig
    from uniter3m.model.uniter import UniterModel
    from uniter3m.train.predict import EmotionClassifier

__all__ = ["EmotionClassifier", "UniterConfig", "UniterModel", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uniter3m' has no attribute {name!r}")
