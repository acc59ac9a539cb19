"""`uniter3m convert`: carry checkpoints in and out of uniter3m.

    uniter3m convert --from hf-bert  --checkpoint HF_DIR                --out OURS    # BERT/RoBERTa (HF)
    uniter3m convert --from tf-bert  --checkpoint DIR/bert_model.ckpt   --out OURS    # Google's TF release
    uniter3m convert --from memobert --checkpoint model_step_N.pt       --out OURS    # MEmoBERT research code
    uniter3m convert --from uniter   --checkpoint model_step_N.pt       --out OURS    # UNITER research code
    uniter3m convert --to hf-bert    --checkpoint OURS                  --out HF_DIR  # our text encoder -> HF BERT
                                                                                      # (a fine-tuned text classifier
                                                                                      #  -> BertForSequenceClassification)

The work is `uniter3m.model.export.convert`; it writes OUT/conversion_report.json (converted / new /
ignored keys) and this prints its summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniter3m.model.export import REPORT_NAME, SOURCE_KINDS, TARGET_KINDS, convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from", dest="source_kind", choices=SOURCE_KINDS, help="convert a checkpoint of this kind into ours"
    )
    direction.add_argument(
        "--to",
        dest="target_kind",
        choices=TARGET_KINDS,
        help="export our checkpoint (--checkpoint) to this kind",
    )
    parser.add_argument(
        "--checkpoint",
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
    report = convert(
        args.checkpoint,
        args.out,
        source_kind=args.source_kind,
        target_kind=args.target_kind,
        model_config=args.model_config,
        seed=args.seed,
        allow_new=args.allow_new,
        mlm_head=not args.no_mlm_head,
        head=not args.no_head,
        overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"wrote {args.out} (full key lists in {args.out / REPORT_NAME})")
    return 0
