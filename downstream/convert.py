"""`uniter3m convert`: carry checkpoints in and out of uniter3m.

    uniter3m convert --from hf-bert  --src HF_DIR            --out OURS   # BERT/RoBERTa (HF)
    uniter3m convert --from tf-bert  --src DIR/bert_model.ckpt --out OURS # Google's TF release
    uniter3m convert --from memobert --src model_step_N.pt   --out OURS   # MEmoBERT research code
    uniter3m convert --from uniter   --src model_step_N.pt   --out OURS   # UNITER research code
    uniter3m convert --to hf-bert    --src OURS              --out HF_DIR # our text encoder -> HF BERT

The key mapping lives in `uniter3m.model.conversion` (pure functions); this recipe reads the
source, builds the model the weights describe (frame dims from the tensor shapes), checks every
tensor against it, saves it, and writes OUT/conversion_report.json (converted / new / ignored keys)
plus a printed summary, so nothing is dropped without the user seeing it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from uniter3m.errors import UserError
from uniter3m.fileio import atomic_write_bytes, atomic_write_json
from uniter3m.model import conversion as conv
from uniter3m.model.config import UniterConfig

SOURCE_KINDS = ("hf-bert", "tf-bert", "uniter", "memobert")
TARGET_KINDS = ("hf-bert",)
REPORT_NAME = "conversion_report.json"
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


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
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the weights the source lacks (new keys)"
    )


def run(args: argparse.Namespace) -> int:
    if args.model_config is not None and args.source_kind not in ("uniter", "memobert"):
        raise UserError(
            "--model-config applies to --from uniter/memobert only (other sources carry their own config.json)"
        )
    _check_out(args.out, args.overwrite)
    if args.target_kind:
        report = export_to_hf_bert(args.src, args.out, with_mlm_head=not args.no_mlm_head)
    else:
        report = convert_to_ours(args.source_kind, args.src, args.out, args.model_config, args.seed)
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
) -> conv.ConversionReport:
    """Read `src` of `kind`, convert, check against the model it describes, save to `out`."""
    src, out = Path(src), Path(out)
    if kind == "hf-bert":
        state, config, report, tokenizer_dir = _read_hf(src)
    elif kind == "tf-bert":
        state, config, report, tokenizer_dir = _read_tf(src)
    elif kind in ("uniter", "memobert"):
        state, config, report, tokenizer_dir = _read_uniter(kind, src, model_config)
    else:
        raise UserError(f"unknown source kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")

    from uniter3m.model.pretraining import UniterForPretraining
    from uniter3m.model.uniter import UniterModel, tied_aliases

    heads = conv.heads_of(state)
    with torch.random.fork_rng(devices=[]):  # seeded init of the new weights, caller's RNG untouched
        torch.manual_seed(seed)
        model = UniterForPretraining(config, heads) if heads else UniterModel(config)
    weights = state if heads else conv.backbone_only(state)
    conv.fit_to_model(weights, model.state_dict(), report, tied_aliases(model))
    conv.require_text_encoder(report, str(src))
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:  # fit_to_model guarantees none; a bug if it happens
        raise RuntimeError(f"keys left unused after the shape check: {result.unexpected_keys}")
    model.save_pretrained(out)
    if not heads:
        (out / "heads.json").unlink(missing_ok=True)  # a stale file from an earlier --overwrite run
    copied = _copy_tokenizer(tokenizer_dir, out)
    _write_report(out, report, src=src, kind=kind, heads=heads, config=config.to_dict(), tokenizer=copied)
    return report


def _read_hf(src: Path) -> tuple[conv.StateDict, UniterConfig, conv.ConversionReport, Path]:
    raw, hf_config = conv.load_hf_directory(src)
    state, report = conv.convert_hf_bert(raw, hf_config)
    overrides: dict[str, Any] = {}
    if conv.hf_family(raw, hf_config) == "roberta":
        kept = int(hf_config["max_position_embeddings"]) - conv.roberta_position_offset(hf_config)
        overrides["max_position_embeddings"] = kept
        if int(hf_config.get("type_vocab_size", 1)) < 2:
            report.note(
                "RoBERTa has one token type: adding a face or speech stream later needs type_vocab_size 2 "
                "(a new, trained-from-scratch type row)"
            )
    config = UniterConfig.from_hf_bert(hf_config, str(src / "config.json"), **overrides)
    return state, config, report, src


def _read_tf(src: Path) -> tuple[conv.StateDict, UniterConfig, conv.ConversionReport, Path]:
    prefix, bert_config = conv.find_tf_checkpoint(src)
    state, report = conv.convert_tf_bert(conv.read_tf_checkpoint(prefix))
    config = UniterConfig.from_hf_bert(bert_config, str(Path(prefix).parent / "bert_config.json"))
    return state, config, report, Path(prefix).parent


def _read_uniter(
    kind: str, src: Path, model_config: str | Path | None
) -> tuple[conv.StateDict, UniterConfig, conv.ConversionReport, Path]:
    file = _latest_step_file(src) if src.is_dir() else src
    state, report = conv.convert_uniter(conv.load_weights_file(file), flavour=kind)
    if file != src:
        report.note(f"converted {file.name}, the latest model_step_N.pt in {src}")
    base = None
    if model_config is not None:
        from uniter3m.config import read_json

        base = read_json(model_config)
    data = conv.infer_config(state, base, report)
    config = UniterConfig.from_dict(data, f"config inferred from {file}")
    return state, config, report, file.parent


def _latest_step_file(folder: Path) -> Path:
    steps = sorted(
        (int(m.group(1)), p)
        for p in folder.glob("model_step_*.pt")
        if (m := re.fullmatch(r"model_step_(\d+)\.pt", p.name))
    )
    if not steps:
        raise UserError(f"{folder} holds no model_step_N.pt; give the checkpoint file itself as --src")
    return steps[-1][1]


# ------------------------------------------------------------------------------ out of ours
def export_to_hf_bert(src: str | Path, out: str | Path, with_mlm_head: bool = True) -> conv.ConversionReport:
    """Our checkpoint dir -> an HF BERT dir (config.json in HF form + model.safetensors)."""
    from safetensors.torch import save

    from uniter3m.model.uniter import read_state_dict

    src, out = Path(src), Path(out)
    config = UniterConfig.from_pretrained(src)
    state, report = conv.export_hf_bert(read_state_dict(src), with_mlm_head=with_mlm_head)
    if not state:
        raise UserError(f"{src} holds no text-encoder weights (embeddings.*, encoder.*): nothing to export")
    architecture = "BertForMaskedLM" if any(k.startswith("cls.") for k in state) else "BertModel"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    atomic_write_bytes(out / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / "config.json", conv.hf_bert_config(config.to_dict(), architecture))
    copied = _copy_tokenizer(src, out)
    _write_report(
        out, report, src=src, kind="uniter3m -> hf-bert", architecture=architecture, tokenizer=copied
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


def _copy_tokenizer(folder: Path, out: Path) -> list[str]:
    """Copy the tokenizer files found next to the source, so the output is self-contained."""
    copied = []
    for name in TOKENIZER_FILES:
        file = folder / name
        if file.is_file() and file.resolve() != (out / name).resolve():
            atomic_write_bytes(out / name, file.read_bytes())
            copied.append(name)
    return copied


def _write_report(out: Path, report: conv.ConversionReport, **context: Any) -> None:
    payload = {k: str(v) if isinstance(v, Path) else v for k, v in context.items()}
    atomic_write_json(out / REPORT_NAME, {**payload, **report.to_dict()})


def read_report(out: str | Path) -> dict[str, Any]:
    """The report a conversion wrote next to its output."""
    return json.loads((Path(out) / REPORT_NAME).read_text(encoding="utf-8"))
