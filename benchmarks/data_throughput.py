"""Data throughput: the full read -> join -> collate path through a DataLoader.

Builds a synthetic corpus (text 30 tokens, 64 x 342 face frames, 64 x 130 speech frames per
utterance, float16 features as `build-feat-db` stores them by default) with DbWriter, then
reads one epoch (or `--seconds`) through JoinedDataset + TokenBucketBatchSampler + Collator for
each worker count and prints a table of batches/s, samples/s and the databases' size on disk.

    python benchmarks/data_throughput.py                  # 100k utterances, 0/2/8 workers
    python benchmarks/data_throughput.py --quick          # 5k utterances, 0/2 workers
    python benchmarks/data_throughput.py --n 20000 --workers 0 4 16 --json out.json

Figures are with a warm page cache (the databases were just written), which is the steady
state of a multi-epoch run on a machine whose RAM holds the corpus. Startup (worker fork and
first batch) is reported apart from the steady rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from uniter3m.data.collate import Collator
from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.sampler import TokenBucketBatchSampler
from uniter3m.data.store import DbWriter
from uniter3m.data.tokenization import SpecialTokens

TXT_LEN, FRAMES, FACE_DIM, SPEECH_DIM = 30, 64, 342, 130
BERT_SPECIAL = SpecialTokens(cls_id=101, sep_id=102, mask_id=103, pad_id=0, unk_id=100, vocab_size=30522)
BANK = 64  # distinct random feature arrays, reused (content does not change read cost)


def build_txt_db(path: Path, n: int, rng: np.random.Generator) -> None:
    w = DbWriter(path, "txt", overwrite=True, commit_every=4096)
    for i in range(n):
        rec = {
            "input_ids": rng.integers(1000, 30000, TXT_LEN, dtype=np.int32),
            "word_ids": np.arange(TXT_LEN, dtype=np.int32),
            "emo_flags": np.zeros(TXT_LEN, dtype=np.uint8),
            "text": "synthetic utterance",
            "labels": {"emotion": int(i % 7)},
        }
        w.put(f"utt{i:07d}", rec, TXT_LEN)
    w.finish({"tokenizer": {**BERT_SPECIAL.to_dict(), "name": "synthetic"}, "label_columns": ["emotion"]})


def build_feat_db(path: Path, n: int, dim: int, rng: np.random.Generator) -> None:
    bank = rng.normal(size=(BANK, FRAMES, dim)).astype(np.float16)
    w = DbWriter(path, "feat", overwrite=True, commit_every=4096)
    for i in range(n):
        w.put(f"utt{i:07d}", {"feat": bank[i % BANK]}, FRAMES)
    flat = bank.reshape(-1, dim).astype(np.float64)
    w.finish(
        {
            "dim": dim,
            "dtype": "float16",
            "mean": flat.mean(0).tolist(),
            "std": flat.std(0).tolist(),
            "soft_label_dim": 0,
            "empty": 0,
        }
    )


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated on disk, apparent bytes) of a database folder."""
    files = [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_blocks * 512 for p in files), sum(p.stat().st_size for p in files)


def measure(ds: JoinedDataset, workers: int, max_tokens: int, seconds: float) -> dict[str, float]:
    sampler = TokenBucketBatchSampler(ds.lengths, max_tokens=max_tokens, seed=0)
    loader = DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=Collator(BERT_SPECIAL),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    startup = time.perf_counter() - start
    batches, samples = 0, 0
    t0 = time.perf_counter()
    for batch in it:
        batches += 1
        samples += len(batch["ids"])
        if time.perf_counter() - t0 > seconds:
            break
    elapsed = time.perf_counter() - t0
    del it
    return {
        "workers": workers,
        "batch_size": len(first["ids"]),
        "startup_s": startup,
        "batches": batches,
        "seconds": elapsed,
        "batches_per_s": batches / elapsed if elapsed else float("nan"),
        "samples_per_s": samples / elapsed if elapsed else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=None, help="utterances (default 100000, --quick 5000)")
    parser.add_argument("--quick", action="store_true", help="5000 utterances, workers 0 and 2")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 0 2 8)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=64 * (TXT_LEN + 2 + 2 * FRAMES),
        help="batch budget (default: 64 items)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="cap on the timed part of each run")
    parser.add_argument("--normalize", action="store_true", help="also normalise features (mean/std)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to build the dbs (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases (and reuse them if present)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    n = args.n or (5000 if args.quick else 100_000)
    workers = args.workers or ([0, 2] if args.quick else [0, 2, 8])

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="uniter3m_bench_"))
    dbs = {name: workdir / f"{name}_{n}" for name in ("txt", "face", "speech")}
    try:
        reuse = args.keep and all((p / "meta.json").is_file() for p in dbs.values())
        build_s = 0.0
        if not reuse:
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            build_txt_db(dbs["txt"], n, rng)
            build_feat_db(dbs["face"], n, FACE_DIM, rng)
            build_feat_db(dbs["speech"], n, SPEECH_DIM, rng)
            build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = JoinedDataset(dbs["txt"], dbs["face"], dbs["speech"], normalize=args.normalize)
        join_s = time.perf_counter() - t0
        sizes = {name: disk_usage(p) for name, p in dbs.items()}
        torch.set_num_threads(1)
        runs = [measure(ds, w, args.max_tokens, args.seconds) for w in workers]
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\ncorpus: {n} utterances (text {TXT_LEN}, face {FRAMES}x{FACE_DIM}, speech {FRAMES}x{SPEECH_DIM}, float16)"
    )
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, python {sys.version.split()[0]}")
    if build_s:
        print(f"build: {build_s:.1f} s ({n / build_s:.0f} utterances/s); join: {join_s:.2f} s")
    else:
        print(f"build: reused {workdir}; join: {join_s:.2f} s")
    print("\n| database | on disk (MiB) | apparent (MiB) | per utterance (KiB) |")
    print("|---|---:|---:|---:|")
    for name, (alloc, apparent) in sizes.items():
        print(f"| {name} | {alloc / 2**20:.1f} | {apparent / 2**20:.1f} | {alloc / n / 1024:.2f} |")
    total = sum(a for a, _ in sizes.values())
    print(
        f"| total | {total / 2**20:.1f} | {sum(b for _, b in sizes.values()) / 2**20:.1f} | {total / n / 1024:.2f} |"
    )
    print("\n| workers | batch size | startup (s) | batches | batches/s | samples/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r['workers']} | {r['batch_size']} | {r['startup_s']:.2f} | {r['batches']} | "
            f"{r['batches_per_s']:.1f} | {r['samples_per_s']:.0f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "n": n,
                    "cpus": os.cpu_count(),
                    "build_s": build_s,
                    "join_s": join_s,
                    "sizes": sizes,
                    "runs": runs,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
