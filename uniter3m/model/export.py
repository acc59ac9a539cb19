"""`uniter3m convert`: model folders from other formats, and our folders exported to HF BERT.

    --from hf-bert|tf-bert|memobert|uniter   any supported checkpoint -> our folder (`convert_to_ours`)
    --to hf-bert                             our folder -> an HF BERT folder (`export_to_hf_bert`; a
                                             fine-tuned text classifier -> BertForSequenceClassification)

The key maps are the pure functions of `model/conversion.py`; reading and loading go through
`model/io.py` (the one reader, `load_into`). Every output gets the tokenizer files found beside
the source, a model card and `conversion_report.json` (converted / new / ignored keys), so
nothing is dropped without the user seeing it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from uniter3m.errors import UserError
from uniter3m.fileio import MANIFEST_NAME, atomic_write_json, building_dir, unlisted_entries, write_manifest
from uniter3m.model import conversion as conv
from uniter3m.model.card import copy_tokenizer, find_tokenizer_dir, native_loading_note, write_model_card
from uniter3m.model.config import CONFIG_NAME
from uniter3m.model.finetuning import FINETUNE_FILE, read_spec
from uniter3m.model.io import (
    WEIGHTS_NAME,
    load_into,
    read_checkpoint,
    read_json_file,
    write_weights,
)
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.model.uniter import UniterModel

SOURCE_KINDS = ("hf-bert", "tf-bert", "uniter", "memobert")
TARGET_KINDS = ("hf-bert",)
REPORT_NAME = "conversion_report.json"


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    source_kind: str | None = None,
    target_kind: str | None = None,
    model_config: str | os.PathLike | None = None,
    seed: int = 0,
    allow_new: Sequence[str] = (),
    mlm_head: bool = True,
    head: bool = True,
    overwrite: bool = False,
) -> conv.ConversionReport:
    """What `uniter3m convert` does: one direction (`source_kind` in, or `target_kind` out) into `out`.

    `out` must be new or empty; with `overwrite` it may hold a model folder uniter3m wrote (every file
    listed by its manifest), which the new one replaces whole. `out` may not be or hold `src`. The
    options of the other direction are refused.
    """
    if (source_kind is None) == (target_kind is None):
        raise UserError("give one direction: --from KIND (into uniter3m) or --to KIND (out of it)")
    if allow_new and not source_kind:
        raise UserError("--allow-new applies to --from conversions only")
    if model_config is not None and source_kind not in ("uniter", "memobert"):
        raise UserError(
            "--model-config applies to --from uniter/memobert only (other sources carry their own config.json)"
        )
    out = Path(out)
    _check_out(Path(src), out, overwrite)
    if target_kind and target_kind not in TARGET_KINDS:
        raise UserError(f"unknown target kind {target_kind!r}; use one of {', '.join(TARGET_KINDS)}")
    with building_dir(out) as tmp:  # swapped in whole: no file of an earlier output is left beside it
        if target_kind:
            return export_to_hf_bert(src, tmp, with_mlm_head=mlm_head, with_head=head)
        return convert_to_ours(source_kind, src, tmp, model_config, seed, allow_new=allow_new)


def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    """`out` must be new or empty, or (with `overwrite`) hold only a model folder we wrote; never the source."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents:
        raise UserError(
            f"--out {out} is the source {src} or holds it: the conversion would replace what it reads. "
            "Give another --out"
        )
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out} is not empty; pass --overwrite to replace it or choose another folder")
    foreign = unlisted_entries(out)
    if foreign:
        raise UserError(
            f"--overwrite: --out {out} holds files uniter3m did not write ({', '.join(foreign[:8])}"
            f"{' ...' if len(foreign) > 8 else ''}; no {MANIFEST_NAME} lists them); nothing was changed. "
            "--overwrite replaces only a model folder uniter3m wrote: choose another --out"
        )


# ------------------------------------------------------------------------------ into ours
def convert_to_ours(
    kind: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    model_config: str | os.PathLike | None = None,
    seed: int = 0,
    allow_new: Sequence[str] = (),
) -> conv.ConversionReport:
    """Read `src` of `kind` with the one reader, fill the model it describes, save it to `out`.

    A backbone weight left without a source (a learned table the checkpoint lacks, a missing
    layer) is an error unless a pattern of `allow_new` names it; new keys are in the report.
    """
    if kind not in SOURCE_KINDS:
        raise UserError(f"unknown source kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    src, out = Path(src), Path(out)
    loaded = read_checkpoint(src, kind, backbone=UniterModel, model_config=model_config)
    config, report, heads = loaded.config, loaded.report, loaded.heads
    with torch.random.fork_rng(devices=[]):  # seeded init of the new weights, caller's RNG untouched
        torch.manual_seed(seed)
        words = int(loaded.meta.get("emo_word_classes", 0))
        model = UniterForPretraining(config, heads, emo_word_classes=words) if heads else UniterModel(config)
    info = load_into(model, loaded, allow_new=allow_new)
    unfit = sorted(set(info["unexpected_keys"]) - set(report.ignored))
    if unfit:  # converted keys the inferred model has no place for
        shown = ", ".join(f"{k} (source {report.converted.get(k, k)})" for k in unfit[:5])
        raise UserError(
            f"{src}: {len(unfit)} converted key(s) have no place in the model the checkpoint describes: {shown}; "
            "the checkpoint does not match the inferred layout (pass --model-config with its real config)"
        )
    model.save_pretrained(out)
    copied = copy_tokenizer(loaded.tokenizer_dir, out)
    _write_report(
        out,
        report,
        src=src,
        kind=kind,
        heads=heads,
        config=config.to_dict(),
        tokenizer=copied,
        allow_new=list(allow_new),
    )
    architecture = "BertForMaskedLM" if "mlm" in heads else "BertModel"
    write_model_card(
        out,
        f"uniter3m checkpoint converted from {kind}",
        f"`{src}` ({kind}) in uniter3m form"
        + (
            ""
            if copied
            else "; no tokenizer files were found beside the source: add the ones it was trained with"
        )
        + ".",
        transformers_use=native_loading_note(architecture),
        sections={
            "Config": config.to_dict(),
            "Conversion": {"new": report.new, "ignored": sorted(report.ignored)},
        },
    )
    write_manifest(out)
    return report


# ------------------------------------------------------------------------------ out of ours
def export_to_hf_bert(
    src: str | os.PathLike, out: str | os.PathLike, with_mlm_head: bool = True, with_head: bool = True
) -> conv.ConversionReport:
    """Our checkpoint dir -> an HF BERT dir (config.json in HF form + model.safetensors + tokenizer).

    A fine-tuned text-only model (`finetune.json`: modalities L, a linear classifier on the cls head)
    becomes a `BertForSequenceClassification` with id2label/label2id, so `transformers.pipeline(
    "text-classification", model=out)` predicts what `uniter3m evaluate` does; `with_head=False`
    exports its encoder alone. Other checkpoints give BertForMaskedLM (with an MLM head) or BertModel.
    """
    src, out = Path(src), Path(out)
    loaded = read_checkpoint(
        src, backbone=UniterModel
    )  # a damaged file or a config that disagrees: a clear error, naming it
    config = loaded.config
    spec = read_spec(src) if (src / FINETUNE_FILE).is_file() else None
    if spec is not None and with_head:
        modalities = spec.get("modalities", "L")
        if modalities != "L":
            raise UserError(
                f"{src} was fine-tuned on modalities {modalities}: a text-only BERT classifier would not make "
                "its predictions; export the encoder alone with --no-head, or fine-tune with data.modalities=L"
            )
        if spec["head"] != "cls":
            raise UserError(
                f"{src} reads the encoder through head {spec['head']!r}; BertForSequenceClassification reads only "
                "the pooled [CLS], so it would not make its predictions: export the encoder alone with --no-head, "
                "or fine-tune with model.head=cls"
            )
        state, report = conv.export_hf_classifier(loaded.state, spec["classifier"], spec["classes"])
        hf_config = conv.hf_classifier_config(config.to_dict(), spec["classifier"], spec["classes"])
    else:
        state, report = conv.export_hf_bert(loaded.state, with_mlm_head=with_mlm_head)
        architecture = "BertForMaskedLM" if any(k.startswith("cls.") for k in state) else "BertModel"
        hf_config = conv.hf_bert_config(config.to_dict(), architecture)
    if not state:
        raise UserError(f"{src} holds no text-encoder weights (embeddings.*, encoder.*): nothing to export")
    architecture = hf_config["architectures"][0]
    out.mkdir(parents=True, exist_ok=True)
    write_weights(out / WEIGHTS_NAME, state)
    soft = loaded.state.get(conv.SOFT_PROMPT_KEY) if spec is None or not with_head else None
    if soft is not None:
        write_weights(out / conv.SOFT_PROMPT_FILE, {"soft_prompt": soft})
    atomic_write_json(out / CONFIG_NAME, hf_config)
    tok_dir = find_tokenizer_dir([src, (spec or {}).get("tokenizer")])
    copied = copy_tokenizer(tok_dir, out)
    _write_report(
        out, report, src=src, kind="uniter3m -> hf-bert", architecture=architecture, tokenizer=copied
    )
    use = (
        f'`transformers.pipeline("text-classification", model=DIR)` or '
        f"`transformers.{architecture}.from_pretrained(DIR)`"
        if architecture == "BertForSequenceClassification"
        else f"`transformers.{architecture}.from_pretrained(DIR)` (and `AutoTokenizer.from_pretrained(DIR)`)"
    )
    write_model_card(
        out,
        f"{architecture} exported from uniter3m",
        f"Text encoder{' and classifier' if spec and with_head else ''} of the uniter3m checkpoint `{src}`, "
        "in plain transformers form. Frame streams (face/speech) are not part of it."
        + (
            f" The {soft.shape[0]} learned prompt vectors (soft_prompt) have no place in BERT: "
            f"`{conv.SOFT_PROMPT_FILE}` holds them (tensor `soft_prompt`, one row per vector); to use the "
            "prompt, embed the ids with `model.get_input_embeddings()`, put row k where the prompt's k-th "
            "vector stood (right before the template's words) and pass the result as `inputs_embeds`."
            if soft is not None
            else ""
        )
        + (
            ""
            if copied
            else " No tokenizer files were found beside the source: add the ones it was trained with."
        ),
        transformers_use=use,
        sections={
            "Config": hf_config,
            "Labels": (spec or {}).get("classes"),
            "Validation (selection)": (spec or {}).get("valid"),
            "Conversion": {"ignored": sorted(report.ignored), "tokenizer files": copied},
        },
    )
    write_manifest(out)
    return report


# ------------------------------------------------------------------------------ the report
def _write_report(out: Path, report: conv.ConversionReport, **context: Any) -> None:
    payload = {k: str(v) if isinstance(v, Path) else v for k, v in context.items()}
    atomic_write_json(out / REPORT_NAME, {**payload, **report.to_dict()})


def read_report(out: str | os.PathLike) -> dict[str, Any]:
    """The report a conversion wrote next to its output."""
    return read_json_file(Path(out) / REPORT_NAME)
