"""Cross-modal distillation in one run (config section `distill`; TelME-style).

A teacher — a fine-tuned `best/` folder, usually text (L) or all modalities — guides students: the
model being fine-tuned, trained on the run's `modality_sets` (the students' sets, e.g. ["A", "V"]:
one set drawn per batch, as in missing-modality training). Per utterance the student learns

    cross-entropy(gold)  +  weight · T² · KL(teacher_T ‖ student_T)  +  feature_weight · MSE(pooled, teacher pooled)

where `x_T` = softmax(logits / T) (Hinton et al.; T² keeps the gradient scale of the soft term
independent of T). The teacher is frozen and runs in eval mode on its own modalities, so its logits and
pooled vectors for a training utterance are the same at every step: they are computed once per fold
(`scoring.predict(..., keep=("logits", "pooled"))`) and looked up by id in the data workers, like the
targets. With `weight` and `feature_weight` 0 the run is plain fine-tuning on the modality sets.

After training, the selected student is scored on each student set, the teacher on its own
modalities, and the final model is `final`: "fusion" (the mean of the teacher's and every student
set's class probabilities, `fuse`) or "student" (the student on the data's modalities: the
all-modality student).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from uniter3m.data.labels import lookup_targets
from uniter3m.errors import ConfigError, UserError
from uniter3m.model.finetuning import FINETUNE_FILE, FinetuneModel, load_finetuned
from uniter3m.tasks.base import TaskOutput, ratio
from uniter3m.tasks.supervised import SupervisedTask

TEACHER_LOGITS = "teacher_logits"
TEACHER_POOLED = "teacher_pooled"


class DistillTask(SupervisedTask):
    """Supervised loss plus KL to the teacher's softened logits and an optional feature-matching MSE.

    `teacher` maps each training id to {"logits": [C], "pooled": [P]}. Loss: mean over utterances."""

    name = "distill"
    not_inputs = (*SupervisedTask.not_inputs, TEACHER_LOGITS, TEACHER_POOLED)

    def __init__(
        self,
        *args: Any,
        teacher: Mapping[str, Mapping[str, Sequence[float]]],
        weight: float = 1.0,
        temperature: float = 2.0,
        feature_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.classifier not in ("linear", "mlp"):
            raise ConfigError(
                f"distill: the student needs a linear or mlp classifier, not {self.classifier!r}"
            )
        self.teacher = {i: dict(v) for i, v in teacher.items()}
        self.weight, self.temperature, self.feature_weight = (
            float(weight),
            float(temperature),
            float(feature_weight),
        )

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        inputs = super().build(batch, generator)
        rows = lookup_targets(
            batch["ids"], self.teacher, what="teacher output", where="the fold's training ids"
        )
        inputs[TEACHER_LOGITS] = torch.tensor([r["logits"] for r in rows], dtype=torch.float32)
        if self.feature_weight:
            inputs[TEACHER_POOLED] = torch.tensor([r["pooled"] for r in rows], dtype=torch.float32)
        return inputs

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        kwargs = {k: v for k, v in inputs.items() if k not in self.not_inputs and v is not None}
        out = model(**kwargs)
        base = self.loss(model, out, inputs)
        t = self.temperature
        student = F.log_softmax(out.logits.float() / t, dim=-1)
        teacher = F.log_softmax(inputs[TEACHER_LOGITS] / t, dim=-1)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
        loss = base.loss + self.weight * kl
        metrics = {**base.metrics, "kl": ratio(kl.detach() * base.n_targets, base.n_targets)}
        if self.feature_weight:
            mse = F.mse_loss(out.pooled.float(), inputs[TEACHER_POOLED])
            loss = loss + self.feature_weight * mse
            metrics["feature_mse"] = ratio(mse.detach() * base.n_targets, base.n_targets)
        return TaskOutput(loss, base.n_targets, metrics)


def load_teacher(template: str, fold: str, fold_index: int, classes: Sequence[str]) -> FinetuneModel:
    """The teacher of fold `fold`: `template` with "{fold}" replaced by the fold folder's name; it must
    be a fine-tuned model of the same classes and, when it records one, of the same fold (a teacher
    tuned on another fold has seen this fold's test utterances)."""
    path = Path(template.replace("{fold}", fold))
    if not (path / FINETUNE_FILE).is_file():
        raise UserError(
            f"distill.teacher {path} has no {FINETUNE_FILE}: give the `<fold>/best` folder of a fine-tuning run "
            '("{fold}" in the path stands for the fold folder, e.g. runs/text/{fold}/best)'
        )
    teacher = load_finetuned(path)
    spec = teacher.spec
    if list(spec.classes) != list(classes):
        raise UserError(
            f"distill.teacher {path} predicts {spec.classes}, this run {list(classes)}; use one protocol"
        )
    if spec.fold_index is not None and spec.fold_index != fold_index:
        raise UserError(
            f"distill.teacher {path} was tuned on fold {spec.fold_index} ({spec.fold}) but this is fold {fold_index} "
            f"({fold}): its training data holds this fold's test utterances; put {{fold}} in distill.teacher"
        )
    if spec.classifier not in ("linear", "mlp"):
        raise UserError(
            f"distill.teacher {path} has a {spec.classifier} classifier; the teacher needs class logits"
        )
    return teacher.eval().requires_grad_(False)


def check_features(student: FinetuneModel, teacher: FinetuneModel, where: str) -> None:
    """Feature matching compares pooled vectors: both models must pool to the same size."""
    if student.pool.size != teacher.pool.size:
        raise ConfigError(
            f"distill.feature_weight: the student pools to {student.pool.size} values but the teacher {where} to "
            f"{teacher.pool.size}; use the same model.head/per_stream and hidden size, or set feature_weight 0"
        )


def fuse(tables: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Late fusion: per id, the mean of each table's class probabilities and its argmax (ties: lowest)."""
    ids = tables[0].keys()
    fused = {}
    for i in ids:
        probs = np.mean([np.asarray(t[i]["probs"], dtype=np.float64) for t in tables], axis=0)
        fused[i] = {"pred": int(np.argmax(probs)), "probs": probs.tolist()}
    return fused
