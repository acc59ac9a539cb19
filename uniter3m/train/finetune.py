"""What fine-tuning, evaluation and extraction share: protocol plans, datasets, the fine-tuning
model, prediction over a split, scoring, and model selection on the training engine.

Honesty rules kept here: targets come from the protocol (never from a batch's inputs); the model
is selected on the VALIDATION split only (`SelectionEvaluator`); with several ranks every rank's
predictions are gathered (each id scored once) before any metric is computed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniter3m import streams as stream_table
from uniter3m.data.collate import Collator
from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.prompts import label_word_ids, tokenize_template
from uniter3m.data.store import DbReader
from uniter3m.data.tokenization import SpecialTokens, load_tokenizer, vocab_hash
from uniter3m.errors import ConfigError, DatabaseError, UserError
from uniter3m.evaluation.corpora import default_verbalizer
from uniter3m.evaluation.metrics import classification_metrics, is_better, regression_metrics
from uniter3m.evaluation.protocols import ProtocolPlan, build_protocol
from uniter3m.model.config import UniterConfig, deep_merge
from uniter3m.model.finetuning import (
    FinetuneModel,
    HeadSpec,
    check_feature_dims,
    freeze,
    load_mlm_head,
    save_finetuned,
)
from uniter3m.model.uniter import UniterModel
from uniter3m.progress import disabled
from uniter3m.tasks.base import TaskContext
from uniter3m.tasks.supervised import SupervisedTask
from uniter3m.train.config import DataConfig, FinetuneConfig
from uniter3m.train.distributed import Backend
from uniter3m.train.loaders import validation_loader
from uniter3m.train.loop import Evaluator, TrainLoop, to_device
from uniter3m.train.precision import Precision

log = logging.getLogger(__name__)
RESOLVED_CONFIG = "config.json"


def find_run_config(checkpoint: str | Path, section: str | None = None) -> Path:
    """The resolved config.json of the run a checkpoint (`<run>/fold/best`) belongs to, for
    `evaluate`/`extract` without `--config`; `section`: a key the config must hold (e.g. "protocol")."""
    ckpt = Path(checkpoint)
    candidates = [p / RESOLVED_CONFIG for p in (ckpt.parent.parent, ckpt.parent)]
    for file in candidates:
        if file.is_file() and (section is None or section in json.loads(file.read_text())):
            return file
    raise UserError(
        f"{ckpt}: no run config.json beside it ({', '.join(map(str, candidates))}); pass --config"
    )


# ----------------------------------------------------------------------------- data
def text_meta(data: DataConfig) -> dict[str, Any]:
    """The text db's meta (every text db of the list must share one tokenizer)."""
    metas = [DbReader(p, kind="txt").meta for p in data.txt_dbs]
    hashes = {(m.get("tokenizer") or {}).get("vocab_hash") for m in metas}
    if len(hashes) > 1:
        raise DatabaseError(
            f"the text databases {data.txt_dbs} were built with different tokenizers; rebuild them with one"
        )
    if "tokenizer" not in metas[0]:
        raise DatabaseError(
            f"{data.txt_dbs[0]}/meta.json has no 'tokenizer' section; rebuild it with build-txt-db"
        )
    return metas[0]


def tokenizer_record(data: DataConfig) -> dict[str, Any]:
    """The tokenizer of the text dbs as a model records it (name, vocab hash, size)."""
    meta = text_meta(data)["tokenizer"]
    return {k: meta.get(k) for k in ("name", "vocab_hash", "vocab_size")}


def untrained_classes(plan: ProtocolPlan, fold: Any) -> list[str]:
    """Classes of the fold's test split that no training utterance has (scored, but listed)."""
    if plan.regression:
        return []
    trained = {int(plan.targets[i]) for i in fold.train}
    tested = {int(plan.targets[i]) for i in fold.test}
    return [plan.label.classes[c] for c in sorted(tested - trained)]


def special_tokens(data: DataConfig) -> SpecialTokens:
    return SpecialTokens.from_dict(text_meta(data)["tokenizer"])


def read_label_rows(data: DataConfig, split_column: str = "split") -> dict[str, dict[str, Any]]:
    """{id: labels} of every record (labels only: no input of the model is read here). With text dbs
    given per split, each record's split comes from its db (`split_column`); a record that says
    otherwise is an error naming it."""
    rows: dict[str, dict[str, Any]] = {}
    split_of = data.split_of
    for path in data.txt_dbs:
        db = DbReader(path, kind="txt")
        for uid in db.ids:
            labels = dict(db[uid].get("labels") or {})
            if split_of:
                own = labels.get(split_column)
                if own is not None and str(own) not in (split_of[path], {"valid": "dev"}.get(split_of[path])):
                    raise UserError(
                        f"{path}: id {uid!r} has {split_column}={own!r} but the db is given as the "
                        f"{split_of[path]!r} split in data.txt_db; fix the config or the db"
                    )
                labels[split_column] = split_of[path]
            rows[uid] = labels
    return rows


def plan_protocol(cfg: FinetuneConfig) -> ProtocolPlan:
    p = cfg.protocol
    if cfg.data.split_of and p.scheme != "split":
        raise UserError(
            f"data.txt_db is given per split, which fixes the folds; use protocol.scheme 'split' (not {p.scheme!r})"
        )
    plan = build_protocol(
        read_label_rows(cfg.data, p.split_column),
        p.name,
        scheme=p.scheme,
        target=p.target,
        label_column=p.label_column,
        classes=p.classes,
        label_map=p.label_map,
        drop_labels=p.drop_labels,
        split_column=p.split_column,
        split_values=None if cfg.data.split_of else p.split_values,
        session_column=p.session_column,
        dialogue_column=p.dialogue_column,
        speaker_column=p.speaker_column,
        valid_fraction=p.valid_fraction,
        selection_metric=p.selection_metric,
        source=", ".join(cfg.data.txt_dbs),
        valid_speakers=p.valid_speakers,
        train_fraction=p.train_fraction,
        subset_seed=p.subset_seed,
    )
    if plan.dropped:
        log.warning("protocol %s dropped rows by label value: %s", plan.name, plan.dropped)
    return plan


def run_tokenizer(cfg: FinetuneConfig) -> str | None:
    """The tokenizer folder the run names (`model.tokenizer`, else `tokenizer`), or None."""
    return cfg.model.tokenizer or cfg.tokenizer


def make_dataset(
    data: DataConfig,
    ids: Sequence[str] | None,
    modalities: str | None = None,
    tokenizer: str | None = None,
) -> JoinedDataset:
    """The joined dataset of `ids` (None: every utterance) reading `modalities` (default: the config's);
    `tokenizer` (a folder) serves `data.context` speaker prefixes (default: the one the text db names)."""
    return JoinedDataset(
        data.txt_dbs,
        feat_dbs=data.feat_dbs,
        modalities=modalities or data.used_modalities,
        max_txt_len=data.max_txt_len,
        max_frames=data.max_frames,
        normalize=data.normalize,
        missing=data.missing,
        ids=ids,
        context=data.context,
        tokenizer=tokenizer,
    )


def feature_dims(dataset: JoinedDataset) -> dict[str, int]:
    return {s: int(dataset.feat_dbs[s][0].meta["dim"]) for s in dataset.streams}


# ----------------------------------------------------------------------------- model
def build_finetune_model(
    cfg: FinetuneConfig, plan: ProtocolPlan, feat_dims: Mapping[str, int], special: SpecialTokens
) -> FinetuneModel:
    """Backbone from `model.init` (or a fresh one from `model.config`) + the configured head."""
    m = cfg.model
    source = m.init or m.config
    base = (
        UniterConfig.from_pretrained(m.init, **m.overrides)
        if m.init
        else UniterConfig.from_json(m.config, **m.overrides)
    )
    overrides = deep_merge(
        m.overrides, check_feature_dims(base, feat_dims, str(source), dict(cfg.data.model_extra or {}))
    )
    if base.vocab_size != special.vocab_size:
        raise DatabaseError(
            f"model {source} has a {base.vocab_size}-word vocabulary but the text db was tokenised with "
            f"{special.vocab_size} words; rebuild the text db with the model's tokenizer"
        )
    if m.init:
        uniter, info = UniterModel.from_pretrained(m.init, output_loading_info=True, **overrides)
        new_weights = set(info["missing_keys"])
    else:
        uniter = UniterModel(UniterConfig.from_json(m.config, **overrides))
        new_weights = {n for n, _ in uniter.named_parameters()}
    spec = HeadSpec(
        head=m.head,
        classes=list(plan.label.classes),
        dropout=m.dropout,
        protocol=plan.name,
        modalities=cfg.data.used_modalities,
    )
    if spec.head == "prompt":
        spec.prompt_ids, spec.verbalizer_ids, spec.verbalizer = prompt_spec(cfg, plan, special)
    model = FinetuneModel(uniter, spec)
    model.new_backbone_weights = new_weights
    if spec.head == "prompt" and m.init:
        load_mlm_head(model, Path(m.init))
    freeze(model, m.freeze_layers, m.freeze_embeddings)
    return model


def prompt_spec(
    cfg: FinetuneConfig, plan: ProtocolPlan, special: SpecialTokens
) -> tuple[list[int], list[int], dict[str, str]]:
    """Prompt ids, label word ids (class order) and the verbaliser, from the one prompt builder."""
    meta = text_meta(cfg.data)["tokenizer"]
    tok_dir = cfg.model.tokenizer or cfg.tokenizer or meta.get("name") or cfg.model.init
    if not tok_dir or not Path(tok_dir).is_dir():
        raise ConfigError(f"the prompt head needs the tokenizer: set model.tokenizer (tried {tok_dir!r})")
    tokenizer = load_tokenizer(tok_dir)
    if meta.get("vocab_hash") and vocab_hash(tokenizer) != meta["vocab_hash"]:
        raise DatabaseError(
            f"tokenizer {tok_dir} differs from the one the text db was built with (vocab hash {meta['vocab_hash']}); "
            "set model.tokenizer to that tokenizer"
        )
    verbalizer = cfg.model.verbalizer or default_verbalizer(plan.name, cfg.protocol.target)
    if not verbalizer:
        raise ConfigError(f"protocol {plan.name} has no default verbaliser: set model.verbalizer")
    prompt_ids = tokenize_template(tokenizer, cfg.model.prompt, special.mask_id, "model.prompt")
    words = label_word_ids(
        tokenizer, verbalizer, special.unk_id, "model.verbalizer", classes=plan.label.classes
    )
    return prompt_ids, [words[c] for c in plan.label.classes], {c: verbalizer[c] for c in plan.label.classes}


def supervised_task(
    model: FinetuneModel,
    plan: ProtocolPlan,
    special: SpecialTokens,
    class_weights: Sequence[float] | None = None,
    modality_subsets: Sequence[str] | None = None,
) -> SupervisedTask:
    """The fine-tuning task; `modality_subsets` (training only) = modality dropout over those cases."""
    return SupervisedTask(
        TaskContext(special=special),
        targets=plan.targets,
        head=model.spec.head,
        prompt_ids=model.spec.prompt_ids,
        class_weights=class_weights,
        max_len=model.config.max_position_embeddings,
        modality_subsets=modality_subsets,
    )


def class_weights(plan: ProtocolPlan, train_ids: Sequence[str]) -> list[float]:
    """Inverse-frequency weights from the TRAINING split only, normalised to mean 1."""
    counts = np.bincount([plan.targets[i] for i in train_ids], minlength=plan.label.num_classes).astype(
        np.float64
    )
    absent = [plan.label.classes[c] for c in np.flatnonzero(counts == 0)]
    if absent:
        raise UserError(f"class_weighted: classes {absent} have no training example in this fold")
    w = counts.sum() / (len(counts) * counts)
    return (w / w.mean()).tolist()


# ----------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict(
    model: FinetuneModel,
    task: SupervisedTask,
    dataset: JoinedDataset,
    cfg: FinetuneConfig,
    backend: Backend,
    precision: Precision,
    desc: str = "score",
) -> dict[str, float | int]:
    """{id: prediction} over the WHOLE dataset: ranks score disjoint batches, then all are gathered."""
    from tqdm.auto import tqdm

    b = cfg.batching
    loader = validation_loader(
        task,
        dataset,
        Collator(
            task.special,
            pad_multiple=b.pad_multiple,
            feature_dtype=b.feature_dtype_for(backend.device),
            packing=b.packing,
        ),
        task_index=0,
        seed=cfg.seed,
        max_tokens=b.val_max_tokens or b.max_tokens,
        max_batch_size=b.val_max_batch_size or b.max_batch_size,
        pool_size=b.pool_size,
        num_workers=b.workers_for(backend.device, backend.local_world_size),
        world_size=backend.world_size,
        rank=backend.rank,
    )
    was_training = model.training
    model.eval()
    local: dict[str, float | int] = {}
    bar = tqdm(
        loader, desc=desc, leave=False, disable=disabled(cfg.progress and backend.is_main), dynamic_ncols=True
    )
    for inputs in bar:
        inputs = to_device(inputs, backend.device)
        kwargs = {k: v for k, v in inputs.items() if k not in ("targets", "ids") and v is not None}
        with precision.autocast():
            out = model(**kwargs)
        local.update(zip(inputs["ids"], model.predictions(out).tolist(), strict=True))
    model.train(was_training)
    merged: dict[str, float | int] = {}
    for part in backend.all_gather_object(local):
        merged.update(part)
    return merged


def score(plan: ProtocolPlan, predictions: Mapping[str, float | int], ids: Sequence[str]) -> dict[str, Any]:
    missing = [i for i in ids if i not in predictions]
    if missing:
        raise UserError(
            f"{len(missing)} utterances got no prediction (e.g. {missing[:3]}); a data shard was lost"
        )
    gold = [plan.targets[i] for i in ids]
    pred = [predictions[i] for i in ids]
    if plan.regression:
        return regression_metrics(gold, pred)
    return classification_metrics(gold, pred, plan.label.num_classes)


def scalars(scores: Mapping[str, Any]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in scores.items() if not isinstance(v, list)}


class SelectionEvaluator(Evaluator):
    """Validation of fine-tuning: the protocol's metric on the validation split; the best model
    is written to `best_dir` (main rank), `patience` validations without improvement stop the run.
    With `cases` ({modality case: validation dataset of that case}) the metric is scored per case
    and the model is selected on the MEAN over the cases (missing-modality training)."""

    def __init__(
        self,
        model: FinetuneModel,
        task: SupervisedTask,
        valid_set: JoinedDataset,
        plan: ProtocolPlan,
        cfg: FinetuneConfig,
        backend: Backend,
        precision: Precision,
        best_dir: Path,
        extra: Mapping[str, Any],
        cases: Mapping[str, JoinedDataset] | None = None,
    ):
        self.model, self.task, self.valid_set, self.plan = model, task, valid_set, plan
        self.cases = dict(cases or {})
        self.cfg, self.backend, self.precision = cfg, backend, precision
        self.best_dir, self.extra = best_dir, dict(extra)
        self.metric = plan.selection_metric
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.history: list[dict[str, Any]] = []
        self.should_stop = False

    def _scores(self) -> dict[str, float]:
        if not self.cases:
            preds = predict(
                self.model, self.task, self.valid_set, self.cfg, self.backend, self.precision, "validate"
            )
            return scalars(score(self.plan, preds, self.valid_set.ids))
        per_case = {}
        for case, dataset in self.cases.items():
            preds = predict(
                self.model, self.task, dataset, self.cfg, self.backend, self.precision, f"validate {case}"
            )
            per_case[case] = scalars(score(self.plan, preds, dataset.ids))
        first = next(iter(per_case.values()))
        scores = {k: round(float(np.mean([c[k] for c in per_case.values()])), 4) for k in first}
        for case, case_scores in per_case.items():
            scores.update({f"{case}_{k}": v for k, v in case_scores.items()})
        return scores

    def evaluate(self, loop: TrainLoop) -> dict[str, float]:
        scores = self._scores()
        value = float(scores[self.metric])
        self.history.append({"step": loop.step, "valid": scores})
        if is_better(self.metric, value, self.best_value):
            self.best_value, self.best_step, self.bad_evals = value, loop.step, 0
            if self.backend.is_main:
                save_finetuned(self.model, self.best_dir, {**self.extra, "step": loop.step, "valid": scores})
            self.backend.barrier()
        else:
            self.bad_evals += 1
        self.should_stop = self.bad_evals >= self.cfg.patience
        if self.backend.is_main:
            log.info(
                "step %d: valid %s = %.4f (best %.4f at step %s)",
                loop.step,
                self.metric,
                value,
                self.best_value,
                self.best_step,
            )
        return {**scores, f"best_{self.metric}": float(self.best_value)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "history": self.history,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.best_step = state["best_step"]
        self.bad_evals = int(state["bad_evals"])
        self.history = list(state["history"])
        self.should_stop = bool(state["should_stop"])


def evaluation_cases(
    cfg: FinetuneConfig, model_config: UniterConfig, cases: Sequence[str] | None
) -> list[str]:
    """Modality cases to score: given ones (checked), or every non-empty subset the config's modalities allow."""
    allowed = cfg.data.used_modalities
    if not cases:
        from itertools import combinations

        return ["".join(c) for r in range(1, len(allowed) + 1) for c in combinations(allowed, r)]
    out = []
    for raw in cases:
        case = stream_table.parse_modalities(raw, f"--modalities {raw}")
        for letter in case.replace("L", ""):
            stream = stream_table.get(letter)
            if stream.name not in cfg.data.feat_dbs:
                raise UserError(
                    f"--modalities {raw}: {stream.name} ({letter}) was asked for but the config sets no "
                    f"data.{stream.db_key}; add it (--set data.{stream.db_key}=DIR) or drop {letter} from the cases"
                )
            if not model_config.stream(stream.name).present:
                raise UserError(
                    f"--modalities {raw}: the checkpoint has no {stream.name} stream (it was fine-tuned without "
                    f"{letter}); drop {letter} from the cases"
                )
        out.append(case)
    return out
