"""`uniter3m convert`: carry checkpoints in and out of uniter3m.

    uniter3m convert --from hf-bert  --src HF_DIR            --out OURS   # BERT/RoBERTa (HF)
    uniter3m convert --from tf-bert  --src DIR/bert_model.ckpt --out OURS # Google's TF release
    uniter3m convert --from memobert --src model_step_N.pt   --out OURS   # MEmoBERT research code
    uniter3m convert --from uniter   --src model_step_N.pt   --out OURS   # UNITER research code
    uniter3m convert --to hf-bert    --src OURS              --out HF_DIR # our text encoder -> HF BERT
                                                                          # (a fine-tuned text classifier ->
                                                                          #  BertForSequenceClassification)

The key mapping lives in `uniter3m.model.conversion` (pure functions); this recipe reads the
source, builds the model the weights describe (frame dims from the tensor shapes), checks every
tensor against it, saves it, and writes OUT/conversion_report.json (converted / new / ignored keys)
plus a printed summary, so nothing is dropped without the user seeing it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from uniter3m.errors import UserError
from uniter3m.fileio import atomic_write_bytes, atomic_write_json
from uniter3m.model import conversion as conv
from uniter3m.model.card import copy_tokenizer, find_tokenizer_dir, native_loading_note, write_model_card

SOURCE_KINDS = ("hf-bert", "tf-bert", "uniter", "memobert")
TARGET_KINDS = ("hf-bert",)
REPORT_NAME = "conversion_report.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from", dest="source_kind", choices=SOURCE_KINDS, help="convert a checkpoint of this kind into ours"
    )
    direction.add_argument(
        "--to", dest="target_kind", choices=TARGET_KINDS, help="export our checkpoint (--src) to this kind"
    )
    parser.add_argument(
        "--src",
        required=True,
        type=Path,
        help="HF model dir, TF checkpoint prefix or its folder, model_step_N.pt (or its folder), or our dir",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--model-config",
        type=Path,
        help="uniter/memobert: the model config JSON the checkpoint was trained with (attention heads, "
        "activation, eps); without it the head count is hidden/64",
    )
    parser.add_argument(
        "--no-mlm-head",
        action="store_true",
        help="--to hf-bert: export the encoder only (BertModel keys), even when the checkpoint has an MLM head",
    )
    parser.add_argument(
        "--no-head",
        action="store_true",
        help="--to hf-bert of a fine-tuned checkpoint: export the encoder without its classifier",
    )
    parser.add_argument(
        "--allow-new",
        action="append",
        default=[],
        metavar="PATTERN",
        help="let backbone weights matching PATTERN (fnmatch on our names, e.g. "
        "'uniter.face_embeddings.position_embeddings.*') start fresh; without it a backbone weight the "
        "checkpoint lacks is an error (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the weights the source lacks (new keys)"
    )


def run(args: argparse.Namespace) -> int:
    if args.allow_new and not args.source_kind:
        raise UserError("--allow-new applies to --from conversions only")
    if args.model_config is not None and args.source_kind not in ("uniter", "memobert"):
        raise UserError(
            "--model-config applies to --from uniter/memobert only (other sources carry their own config.json)"
        )
    _check_out(args.out, args.overwrite)
    if args.target_kind:
        report = export_to_hf_bert(
            args.src, args.out, with_mlm_head=not args.no_mlm_head, with_head=not args.no_head
        )
    else:
        report = convert_to_ours(
            args.source_kind, args.src, args.out, args.model_config, args.seed, allow_new=args.allow_new
        )
    print(report.summary())
    print(f"wrote {args.out} (full key lists in {args.out / REPORT_NAME})")
    return 0


# ------------------------------------------------------------------------------ into ours
def convert_to_ours(
    kind: str,
    src: str | Path,
    out: str | Path,
    model_config: str | Path | None = None,
    seed: int = 0,
    allow_new: Sequence[str] = (),
) -> conv.ConversionReport:
    """Read `src` of `kind` with the one checkpoint reader, fill the model it describes, save to `out`.

    A backbone weight left without a source (a learned table the checkpoint lacks, a missing
    layer) is an error unless a pattern of `allow_new` names it; new keys are in the report.
    """
    from uniter3m.model.loading import load_into, read_checkpoint
    from uniter3m.model.pretraining import UniterForPretraining
    from uniter3m.model.uniter import UniterModel

    if kind not in SOURCE_KINDS:
        raise UserError(f"unknown source kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    src, out = Path(src), Path(out)
    loaded = read_checkpoint(src, kind, model_config=model_config)
    config, report, heads = loaded.config, loaded.report, loaded.heads
    with torch.random.fork_rng(devices=[]):  # seeded init of the new weights, caller's RNG untouched
        torch.manual_seed(seed)
        model = UniterForPretraining(config, heads) if heads else UniterModel(config)
    info = load_into(model, loaded, allow_new=allow_new)
    unfit = sorted(set(info["unexpected_keys"]) - set(report.ignored))
    if unfit:  # converted keys the inferred model has no place for
        shown = ", ".join(f"{k} (source {report.converted.get(k, k)})" for k in unfit[:5])
        raise UserError(
            f"{src}: {len(unfit)} converted key(s) have no place in the model the checkpoint describes: {shown}; "
            "the checkpoint does not match the inferred layout (pass --model-config with its real config)"
        )
    model.save_pretrained(out)
    if not heads:
        (out / "heads.json").unlink(missing_ok=True)  # a stale file from an earlier --overwrite run
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
    return report


# ------------------------------------------------------------------------------ out of ours
def export_to_hf_bert(
    src: str | Path, out: str | Path, with_mlm_head: bool = True, with_head: bool = True
) -> conv.ConversionReport:
    """Our checkpoint dir -> an HF BERT dir (config.json in HF form + model.safetensors + tokenizer).

    A fine-tuned text-only classifier (`finetune.json`, modalities L, linear head) becomes a
    `BertForSequenceClassification` with id2label/label2id, so `transformers.pipeline(
    "text-classification", model=out)` predicts what `uniter3m evaluate` does; `with_head=False`
    exports its encoder alone. Other checkpoints give BertForMaskedLM (with an MLM head) or BertModel.
    """
    from safetensors.torch import save

    from uniter3m.model.finetuning import FINETUNE_FILE
    from uniter3m.model.loading import read_checkpoint

    src, out = Path(src), Path(out)
    loaded = read_checkpoint(src)  # a damaged file or a config that disagrees: a clear error, naming it
    config = loaded.config
    spec_file = src / FINETUNE_FILE
    spec = json.loads(spec_file.read_text(encoding="utf-8")) if spec_file.is_file() else None
    if spec is not None and with_head:
        modalities = spec.get("modalities", "L")
        if modalities != "L":
            raise UserError(
                f"{src} was fine-tuned on modalities {modalities}: a text-only BERT classifier would not make "
                "its predictions; export the encoder alone with --no-head, or fine-tune with data.modalities=L"
            )
        state, report = conv.export_hf_classifier(loaded.state, spec["head"], spec["classes"])
        hf_config = conv.hf_classifier_config(config.to_dict(), spec["head"], spec["classes"])
    else:
        state, report = conv.export_hf_bert(loaded.state, with_mlm_head=with_mlm_head)
        architecture = "BertForMaskedLM" if any(k.startswith("cls.") for k in state) else "BertModel"
        hf_config = conv.hf_bert_config(config.to_dict(), architecture)
    if not state:
        raise UserError(f"{src} holds no text-encoder weights (embeddings.*, encoder.*): nothing to export")
    architecture = hf_config["architectures"][0]
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_write_bytes(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", hf_config)
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
    return report


# ------------------------------------------------------------------------------ helpers
def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"--out {out} is not empty; pass --overwrite to write into it or choose another folder"
        )


def _write_report(out: Path, report: conv.ConversionReport, **context: Any) -> None:
    payload = {k: str(v) if isinstance(v, Path) else v for k, v in context.items()}
    atomic_write_json(out / REPORT_NAME, {**payload, **report.to_dict()})


def read_report(out: str | Path) -> dict[str, Any]:
    """The report a conversion wrote next to its output."""
    return json.loads((Path(out) / REPORT_NAME).read_text(encoding="utf-8"))
