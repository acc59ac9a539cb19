"""The task interface every pretraining objective implements, its registry, and modality dropout.

A task has two halves so that the costly CPU work stays out of the training step:

* ``prepare(batch, generator) -> dict`` runs in a DataLoader worker, on CPU, and is
  deterministic for a given ``torch.Generator``: it drops streams (modality dropout), masks or
  shuffles inputs and builds targets. The dict holds the model's keyword arguments
  (``model_keys()``) plus the task's own target tensors.
* ``forward(model, inputs) -> TaskOutput`` runs the model (``UniterForPretraining``: backbone
  ``model.uniter`` plus heads) on the device and returns a loss that is a mean over the task's
  own targets, their count, and metrics as ``(numerator, denominator)`` tensors, so sums over
  ranks give exact means.

Streams are named by letter: ``L`` (text), then the frame streams of the stream table the task
context carries (``TaskContext.stream_table``, the run config's; ``uniter3m.streams``): ``V`` (face)
and ``A`` (speech) as in the MEmoBERT papers, and any declared stream.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uniter3m.data.labels import lookup_targets
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError, UserError
from uniter3m.model.uniter import unwrap
from uniter3m.streams import TEXT_LETTER, StreamTable


def model_keys(table: StreamTable) -> tuple[str, ...]:
    """The backbone's keyword arguments: text, then each frame stream's feat/mask/frame_mask."""
    frames = [k for s in table.frame_streams() for k in (s.feat_key, s.mask_key, s.frame_mask_key)]
    return (
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "padded",
        "pack_src",
        "pack_dst",
        "pack_doc",
        "soft_slots",
        *frames,
    )


@dataclass
class TaskContext:
    """What tasks may read besides the batch: special ids, the tokenizer for prompt words, and the
    stream table (the run config's) that gives the modality letters and batch keys."""

    special: SpecialTokens
    tokenizer: Any = None
    stream_table: StreamTable = StreamTable()


@dataclass
class TaskOutput:
    """``loss`` is a mean over ``n_targets`` targets; metrics map a name to (numerator, denominator)."""

    loss: torch.Tensor
    n_targets: torch.Tensor
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def ratio(
    numerator: torch.Tensor | float, denominator: torch.Tensor | float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A metric entry as two detached float tensors on one device, summable across ranks."""
    if device is None:
        for value in (numerator, denominator):
            if isinstance(value, torch.Tensor):
                device = value.device
                break
    return _as_metric(numerator, device), _as_metric(denominator, device)


def _as_metric(value: torch.Tensor | float, device: torch.device | None) -> torch.Tensor:
    # a Python number becomes a device tensor by a fill kernel, not a copy that waits on the host
    if isinstance(value, torch.Tensor):
        return value.detach().float().to(device) if device is not None else value.detach().float()
    return torch.full((), float(value), device=device)


# ------------------------------------------------------------------------- sync-free gathering
def flat_index(mask: torch.Tensor) -> torch.Tensor:
    """Flat positions (N,) of the True entries of a (B, T) CPU mask. Computed in `prepare` (in the
    data workers), so the training step gathers with an index of known size and never waits for
    the device to say how many targets there are (boolean indexing does: a `nonzero` sync)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def gather_flat(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (N, ...) at the flat positions `index` (an index_select: no host sync)."""
    return values.reshape(-1, *values.shape[2:]).index_select(0, index.to(values.device))


def count(reference: torch.Tensor, n: int) -> torch.Tensor:
    """The number of targets as a float tensor on `reference`'s device (a fill, no host copy)."""
    return torch.full((), float(n), device=reference.device)


def mean_over(total: torch.Tensor, n: int) -> torch.Tensor:
    """A loss summed over `n` targets as their mean; 0 targets give 0, still attached to the graph."""
    return total / max(n, 1)


def wants_chance(model: torch.nn.Module) -> bool:
    """Chance levels are validation figures: training steps skip them (some need a host sync)."""
    return not unwrap(model).training


# ------------------------------------------------------------------------------------- modality subsets


def parse_streams(value: str | Iterable[str], where: str, table: StreamTable) -> frozenset[str]:
    """``"LV"``, ``["L", "V"]`` or ``["text", "face"]`` -> frozenset({"L", "V"})."""
    return frozenset(table.parse_modalities(value, where))


def batch_streams(batch: Mapping[str, Any], table: StreamTable) -> frozenset[str]:
    """Streams of `table` the batch carries (text always travels as input_ids, maybe only [CLS] [SEP])."""
    present = {TEXT_LETTER}
    for s in table.frame_streams():
        if batch.get(s.feat_key) is not None:
            present.add(s.letter)
    return frozenset(present)


def has_padding(inputs: Mapping[str, Any], table: StreamTable) -> bool:
    """Whether any mask the backbone will get has a False: decided on the CPU, in the data worker,
    so the model passes SDPA no mask for unpadded batches without a device->host sync."""
    keys = ["attention_mask", *(s.mask_key for s in table.frame_streams())]
    return any(isinstance(inputs.get(k), torch.Tensor) and not bool(inputs[k].all()) for k in keys)


def text_absent(batch: Mapping[str, Any], special: SpecialTokens) -> bool:
    """True when every row of the text is only [CLS] [SEP] (the text modality is off)."""
    ids = batch["input_ids"]
    real = batch["txt_mask"].bool() & (ids != special.cls_id) & (ids != special.sep_id)
    return not bool(real.any())


def keep_streams(
    batch: Mapping[str, Any], keep: frozenset[str], special: SpecialTokens, table: StreamTable
) -> dict[str, Any]:
    """A shallow copy of ``batch`` without the streams outside ``keep``.

    Without L the text becomes ``[CLS] [SEP]`` per sample (the pooler still needs a [CLS]),
    as the batch contract prescribes; without V or A their keys are removed.
    """
    out = dict(batch)
    if "L" not in keep:
        bsz = batch["input_ids"].shape[0]
        out["input_ids"] = torch.tensor([special.cls_id, special.sep_id]).repeat(bsz, 1)
        out["txt_mask"] = torch.ones(bsz, 2, dtype=torch.bool)
        out["word_ids"] = torch.full((bsz, 2), -1, dtype=torch.long)
        out["emo_flags"] = torch.zeros(bsz, 2, dtype=torch.bool)
        out["ctx_flags"] = torch.zeros(bsz, 2, dtype=torch.bool)
    for s in table.frame_streams():
        if s.letter not in keep:
            for key in (s.feat_key, s.mask_key, s.soft_key):
                out.pop(key, None)
    return out


# ----------------------------------------------------------------------------------------------- task


class Task:
    """Base class: option checking, modality dropout, the model call and shared helpers.

    Options every task takes:

    * ``modality_sets``: list of modality sets, e.g. ``[["L","A"], ["L","V"], ["L","V","A"]]``;
      each batch sees one of them, drawn uniformly (or with ``modality_weights``). Streams the batch
      does not carry are simply absent. Every subset must contain the streams the task requires.
    * ``modality_weights``: optional sampling weights, one per subset.
    """

    name: str = "task"
    #: UniterForPretraining heads (attribute names) the task uses.
    heads: tuple[str, ...] = ()
    #: streams that must be present for the task to have targets.
    streams: tuple[str, ...] = ()

    def __init__(
        self,
        context: TaskContext,
        *,
        name: str | None = None,
        modality_sets: Sequence[Sequence[str] | str] | None = None,
        modality_weights: Sequence[float] | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        self.context = context
        self.special = context.special
        self.stream_table = context.stream_table
        #: the backbone's keyword arguments (`encode` passes these of the inputs)
        self.model_keys = model_keys(context.stream_table)
        self.modality_sets: list[frozenset[str]] | None = None
        self.modality_weights: torch.Tensor | None = None
        if modality_sets is not None:
            where = f"task {self.name}: modality_sets"
            subsets = [parse_streams(s, where, self.stream_table) for s in modality_sets]
            if not subsets:
                raise ConfigError(f"{where} is empty; leave it out or give at least one subset")
            for subset in subsets:
                missing = set(self.streams) - subset
                if missing:
                    raise ConfigError(
                        f"{where}: subset {''.join(sorted(subset))} lacks {', '.join(sorted(missing))}, "
                        f"which {self.name} needs for its targets; add it to every subset"
                    )
            self.modality_sets = subsets
            if modality_weights is not None:
                weights = torch.tensor([float(w) for w in modality_weights])
                if len(weights) != len(subsets) or (weights < 0).any() or weights.sum() <= 0:
                    raise ConfigError(
                        f"task {self.name}: modality_weights {list(modality_weights)} must be "
                        f"{len(subsets)} non-negative numbers, not all 0"
                    )
                self.modality_weights = weights
        elif modality_weights is not None:
            raise ConfigError(f"task {self.name}: modality_weights given without modality_sets")

    # -- the interface ---------------------------------------------------------------------------

    def prepare(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, Any]:
        """Drop streams (modality dropout), check the required ones, then ``build`` the inputs."""
        batch = self.drop_modalities(batch, generator)
        self.check_streams(batch)
        inputs = self.build(batch, generator)
        inputs.setdefault("ids", batch.get("ids"))
        if isinstance(inputs.get("attention_mask"), torch.Tensor):
            inputs["padded"] = has_padding(inputs, self.stream_table)
        return inputs

    def build(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        raise NotImplementedError

    def __call__(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> TaskOutput:
        return self.forward(model, inputs)

    def state_dict(self) -> dict[str, Any]:
        """What the task learns outside the model's parameters (tensors and plain values), saved
        per rank in every checkpoint so that a resume is exact; most tasks have none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output (an empty mapping: a checkpoint saved without it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -- helpers ---------------------------------------------------------------------------------

    def sample_subset(self, generator: torch.Generator) -> frozenset[str] | None:
        """The stream subset of this batch (None: no modality dropout configured)."""
        if self.modality_sets is None:
            return None
        if self.modality_weights is None:
            index = int(torch.randint(len(self.modality_sets), (), generator=generator))
        else:
            index = int(torch.multinomial(self.modality_weights, 1, generator=generator))
        return self.modality_sets[index]

    def drop_modalities(self, batch: Mapping[str, Any], generator: torch.Generator) -> dict[str, Any]:
        subset = self.sample_subset(generator)
        return dict(batch) if subset is None else keep_streams(batch, subset, self.special, self.stream_table)

    def batch_streams(self, batch: Mapping[str, Any]) -> frozenset[str]:
        """The stream letters the batch carries."""
        return batch_streams(batch, self.stream_table)

    def check_streams(self, batch: Mapping[str, Any]) -> None:
        present = self.batch_streams(batch)
        names = self.stream_table.modality_names()
        for key in self.streams:
            if key not in present:
                raise UserError(
                    f"task {self.name} needs the {names[key]} stream ({key}) but the batch "
                    f"(ids {list(batch.get('ids', []))[:3]}...) has none: give this task a dataset with "
                    f"a {names[key]} feature db"
                )

    def label_values(self, batch: Mapping[str, Any], column: str) -> Sequence[Any]:
        """The batch's raw values of label column `column` (hard labels, emotion_itm, ranking codes);
        a batch without that column is an error naming the columns it has."""
        values = batch.get("labels", {}).get(column)
        if values is None:
            raise UserError(
                f"task {self.name}: the batch has no label column {column!r} "
                f"(columns: {sorted(batch.get('labels', {}))}); set label_column to one of them"
            )
        return values

    def label_targets(
        self, batch: Mapping[str, Any], column: str, table: Mapping[str, int], what: str, fix: str
    ) -> torch.Tensor:
        """Label column `column` mapped through `table` (label -> target index), a long tensor; labels
        the table lacks are one error listing them, with `fix` (`uniter3m.data.labels.lookup_targets`)."""
        out = lookup_targets(
            self.label_values(batch, column),
            table,
            what=what,
            where=f"task {self.name}",
            ids=list(batch.get("ids", [])),
            fix=fix,
        )
        return torch.tensor(out, dtype=torch.long)

    def model_inputs(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """The backbone's keyword arguments from a batch (text mask = ``txt_mask``)."""
        out: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["txt_mask"]}
        for s in self.stream_table.frame_streams():
            if batch.get(s.feat_key) is not None:
                out[s.feat_key] = batch[s.feat_key]
                out[s.mask_key] = batch[s.mask_key]
        return out

    def encode(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> Any:
        """Run the backbone on the model keys of ``inputs`` (returns a UniterOutput)."""
        return call_model(model, **{k: inputs[k] for k in self.model_keys if inputs.get(k) is not None})


class FrameStreamTask(Task):
    """A task on one frame stream: option ``stream`` (the stream's letter, fixed by the task name);
    its head is ``<stream name>_<head_suffix>`` (``face_regress``, ``speech_fom``, ...)."""

    head_suffix: str = ""

    def __init__(self, context: TaskContext, *, stream: str = "V", **common: Any) -> None:
        frame_letters = context.stream_table.frame_letters()
        if stream not in frame_letters:
            raise ConfigError(
                f"task option stream={stream!r}; use a frame stream's letter: {', '.join(frame_letters)}"
            )
        self.stream = stream
        self.prefix = frame_letters[stream]
        self.streams = (stream,)
        self.head_name = f"{self.prefix}_{self.head_suffix}"
        self.heads = (self.head_name,)
        super().__init__(context, **common)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The UniterModel inside a (wrapped) UniterForPretraining, or a bare UniterModel."""
    inner = unwrap(model)
    return getattr(inner, "uniter", inner)


def head(model: torch.nn.Module, name: str, task: str) -> torch.nn.Module:
    """A head by attribute path (``"cls.predictions"``), with an error that says how to add it."""
    obj: Any = unwrap(model)
    for part in name.split("."):
        obj = obj[part] if isinstance(obj, torch.nn.ModuleDict) and part in obj else getattr(obj, part, None)
        if obj is None:
            raise ConfigError(
                f"task {task} needs the head {name!r} but the model has none: build "
                f"UniterForPretraining with heads including {_HEAD_OF.get(name, name)!r}"
            )
    return obj


_HEAD_OF = {"cls.predictions": "mlm"}


def call_model(model: torch.nn.Module, **kwargs: Any) -> Any:
    """Run the backbone through the model's own ``forward`` (so a DDP wrapper sees the call)."""
    return model(**{k: v for k, v in kwargs.items() if v is not None})


def segment_states(output: Any, stream: str) -> torch.Tensor:
    """Hidden states of one stream's slots, (B, T, H)."""
    states = output.stream_states.get(stream)
    if states is None:
        raise UserError(f"the model output has no {stream} segment; was the {stream} stream passed?")
    return states


def zero_loss(reference: torch.Tensor) -> torch.Tensor:
    """A zero loss still attached to the graph, for a batch with no targets (DDP needs a backward)."""
    return reference.sum() * 0.0


# ------------------------------------------------------------------------------------------- registry

# name -> (module, class, options fixed by the name); DEFAULTS: options the user may override.
_REGISTRY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mlm": ("uniter3m.tasks.mlm", "MlmTask", {"unit": "token", "emotion": False}),
    "wwm": ("uniter3m.tasks.mlm", "MlmTask", {"unit": "word", "emotion": False}),
    "melm": ("uniter3m.tasks.mlm", "MlmTask", {"unit": "token", "emotion": True}),
    "melm_wwm": ("uniter3m.tasks.mlm", "MlmTask", {"unit": "word", "emotion": True}),
    "itm": ("uniter3m.tasks.matching", "MatchingTask", {"hard": False}),
    "itm_hard": ("uniter3m.tasks.matching", "MatchingTask", {"hard": True}),
    "emotion_itm": ("uniter3m.tasks.matching", "MatchingTask", {"hard": False, "emotion": True}),
    "itm_rank": ("uniter3m.tasks.ranking", "RankingTask", {}),
    "contrastive": ("uniter3m.tasks.matching", "ContrastiveTask", {}),
    "tuple_contrastive": ("uniter3m.tasks.tuple_nce", "TupleContrastiveTask", {}),
    "prompt": ("uniter3m.tasks.prompt", "PromptTask", {}),
    "prompt_cross": ("uniter3m.tasks.prompt", "PromptTask", {}),
    "emo_cls": ("uniter3m.tasks.emo_cls", "EmoClsTask", {}),
}
# Frame objectives exist for every stream of the table: `<stream>_mrfr`, `<stream>_mrc`, `<stream>_fom`.
_FRAME_TASKS: dict[str, tuple[str, str]] = {
    "mrfr": ("uniter3m.tasks.frames", "FrameRegressionTask"),
    "mrc": ("uniter3m.tasks.frames", "FrameSoftLabelTask"),
    "fom": ("uniter3m.tasks.fom", "FrameOrderTask"),
}
_ALIASES = {
    "msrfr": "speech_mrfr",
    "mrfr": "face_mrfr",
    "mrc_kl": "face_mrc",
    "vfom": "face_fom",
    "sfom": "speech_fom",
}


_DEFAULTS: dict[str, dict[str, Any]] = {
    "prompt_cross": {"modality_sets": ["L", "V", "A", "LV", "LA", "VA", "LVA"]},
}


def _defaults(key: str) -> dict[str, Any]:
    return dict(_DEFAULTS.get(key, {}))


def _resolve(name: str, table: StreamTable) -> tuple[str, str, dict[str, Any]]:
    key = _ALIASES.get(name, name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    stream, _, kind = key.rpartition("_")
    if kind in _FRAME_TASKS and stream in table.names():
        module, cls = _FRAME_TASKS[kind]
        return module, cls, {"stream": table.get(stream).letter}
    raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(task_names(table))}")


def task_names(table: StreamTable) -> list[str]:
    """Every task name with the frame streams of `table`."""
    frame = [f"{s.name}_{kind}" for s in table.frame_streams() for kind in _FRAME_TASKS]
    return sorted([*_REGISTRY, *frame])


def task_class(name: str, table: StreamTable) -> type[Task]:
    module, cls, _ = _resolve(name, table)
    return getattr(importlib.import_module(module), cls)


def build_task(name: str, context: TaskContext, **options: Any) -> Task:
    """Build a registered task; unknown option keys are all listed in one ConfigError."""
    key = _ALIASES.get(name, name)
    cls = task_class(key, context.stream_table)
    preset = dict(_resolve(key, context.stream_table)[2])
    accepted = _accepted_options(cls)
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ConfigError(
            f"task {name}: unknown option(s) {', '.join(unknown)}; {name} accepts {', '.join(sorted(accepted))}"
        )
    fixed = sorted(k for k in options if k in preset and options[k] != preset[k])
    if fixed:
        raise ConfigError(
            f"task {name}: option(s) {', '.join(fixed)} are fixed by the task name; use another task"
        )
    try:
        return cls(context, name=name, **{**_defaults(key), **options, **preset})
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"task {name}: an option has the wrong type or value ({type(err).__name__}: {err}); options given: "
            f"{options}; see the {cls.__name__} docstring for each option's type"
        ) from None


def _accepted_options(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for pname, param in inspect.signature(init).parameters.items():
            if pname not in ("self", "context", "name") and param.kind is inspect.Parameter.KEYWORD_ONLY:
                names.add(pname)
    return names
