"""`UniterForPretraining`: the backbone (`uniter`) plus the heads the objectives ask for.

Head attributes (state-dict prefixes) and what MEmoBERT called them:

| attribute | head | MEmoBERT |
|---|---|---|
| `cls.predictions` | MLM (HF names, decoder tied to word embeddings) | `cls.predictions` |
| `face_regress`, `speech_regress` | frame regression (tied to the stream's `feat_linear`) | `feat_regress`, `speech_feat_regress` |
| `face_classifier` | per-frame soft-label classes (`face.soft_label_dim`) | `region_classifier` |
| `face_fom`, `speech_fom` | frame order (scores slots against position embeddings) | `vfom_output`, `sfom_output` |
| `itm` | matching, Linear(H, 2) | `itm_output` |
| `emo_classifier` | utterance emotion classes (`emo_classes`) | `emo_classifier` |
| `emo_word_classifier` | a masked word's emotion category (`emo_word_classes`; MELM `emotion_head`), UNITER's 2H MLP | `emomelm_classifier` |

Frame heads exist for every stream of the model config's stream table (`<name>_regress`,
`<name>_fom`, `<name>_classifier`), so a declared stream gets them with no code change.

`forward(**inputs)` runs the backbone (so DDP sees a forward); objectives apply heads to its output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from torch import nn

from uniter3m.errors import ConfigError
from uniter3m.model.config import UniterConfig
from uniter3m.model.heads import (
    ClassificationHead,
    FrameClassificationHead,
    FrameOrderHead,
    FrameRegressionHead,
    ItmHead,
    MlmHead,
)
from uniter3m.model.io import HEADS_FILE, load_into, read_checkpoint, write_pretrained
from uniter3m.model.uniter import UniterModel, UniterOutput, init_bert_weights
from uniter3m.streams import StreamTable

TEXT_HEADS = ("mlm", "itm", "emo_classifier", "emo_word_classifier")
FRAME_HEAD_KINDS = ("regress", "fom", "classifier")


def head_names(table: StreamTable) -> list[str]:
    """Every head a model with the streams of `table` can have."""
    frame = [f"{s.name}_{kind}" for s in table.frame_streams() for kind in FRAME_HEAD_KINDS]
    return [*TEXT_HEADS, *frame]


def _frame_head(name: str, table: StreamTable) -> tuple[str, str] | None:
    """(stream, kind) of a frame head name, e.g. "pose_fom" -> ("pose", "fom"); None for text heads."""
    stream, _, kind = name.rpartition("_")
    if kind in FRAME_HEAD_KINDS and stream in table.names():
        return stream, kind
    return None


class UniterForPretraining(nn.Module):
    def __init__(
        self,
        config: UniterConfig,
        heads: Iterable[str] = ("mlm",),
        emo_classes: int = 0,
        emo_word_classes: int = 0,
    ):
        super().__init__()
        heads = list(dict.fromkeys(heads))
        table = config.stream_table
        unknown = [h for h in heads if h not in TEXT_HEADS and _frame_head(h, table) is None]
        if unknown:
            raise ConfigError(f"unknown head(s) {unknown}; the heads are {head_names(table)}")
        self.config = config
        self.heads = heads
        self.emo_classes = emo_classes
        self.emo_word_classes = emo_word_classes
        self.uniter = UniterModel(config)
        h, eps = config.hidden_size, config.layer_norm_eps
        for name in heads:
            frame = _frame_head(name, table)
            if frame is not None:
                stream, kind = frame
                section = config.stream(stream)
                if not section.present:
                    raise ConfigError(
                        f"head {name!r} needs a {stream} stream: give the model config a {stream} feat_dim"
                    )
                if kind == "regress":
                    module = FrameRegressionHead(self.uniter.stream_embeddings(stream).feat_linear, eps)
                elif kind == "fom":
                    module = FrameOrderHead(h, eps)
                else:
                    if not section.soft_label_dim:
                        raise ConfigError(
                            f"head {name!r} needs per-frame soft labels: {stream}.soft_label_dim > 0 "
                            f"(build the {stream} database with soft labels)"
                        )
                    module = FrameClassificationHead(h, section.soft_label_dim, eps)
                setattr(self, name, module)
            elif name == "mlm":
                self.cls = nn.ModuleDict(
                    {"predictions": MlmHead(self.uniter.embeddings.word_embeddings, config.hidden_act, eps)}
                )
            elif name == "itm":
                self.itm = ItmHead(h)
            elif name == "emo_classifier":
                if emo_classes < 1:
                    raise ConfigError(
                        "head 'emo_classifier' needs emo_classes >= 1 (the number of emotion classes)"
                    )
                self.emo_classifier = ClassificationHead(h, emo_classes, config.hidden_dropout_prob)
            elif name == "emo_word_classifier":
                if emo_word_classes < 2:
                    raise ConfigError(
                        "head 'emo_word_classifier' needs emo_word_classes >= 2 (no emotion + the lexicon's categories)"
                    )
                self.emo_word_classifier = ClassificationHead(h, emo_word_classes, 0.0, kind="mlp")
        self._init_heads()

    def _init_heads(self) -> None:
        """BERT init for the heads, leaving alone the backbone weights they share (tied decoders)."""
        backbone = {id(p) for p in self.uniter.parameters()}
        for name, module in self.named_children():
            for m in module.modules() if name != "uniter" else ():
                if not any(id(p) in backbone for p in m.parameters(recurse=False)):
                    init_bert_weights(m, self.config.initializer_range)

    def forward(self, **inputs: Any) -> UniterOutput:
        return self.uniter(**inputs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """config.json + model.safetensors (+ heads.json); tied head weights are stored once."""
        write_pretrained(
            self,
            directory,
            {
                HEADS_FILE: {
                    "heads": self.heads,
                    "emo_classes": self.emo_classes,
                    "emo_word_classes": self.emo_word_classes,
                }
            },
        )

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        heads: Iterable[str] | None = None,
        emo_classes: int | None = None,
        emo_word_classes: int | None = None,
        output_loading_info: bool = False,
        **config_overrides: Any,
    ) -> UniterForPretraining | tuple[UniterForPretraining, dict[str, Any]]:
        """Load ours, a UniterModel directory or an HF BERT one (its MLM head too, as `cls.predictions`).

        `heads`/`emo_classes` default to those in heads.json (ours) or just MLM (other directories).
        """
        loaded = read_checkpoint(directory, backbone=UniterModel)
        heads = list(heads) if heads is not None else loaded.meta.get("heads", ["mlm"])
        emo = emo_classes if emo_classes is not None else int(loaded.meta.get("emo_classes", 0))
        words = (
            emo_word_classes if emo_word_classes is not None else int(loaded.meta.get("emo_word_classes", 0))
        )
        model = cls(loaded.model_config(**config_overrides), heads, emo, words)
        info = load_into(model, loaded)
        return (model, info) if output_loading_info else model
