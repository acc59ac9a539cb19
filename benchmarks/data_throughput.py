"""Data throughput: the full read -> join -> collate path through a DataLoader, and the choices of
`batching` that shape it (issue 26 item 5).

1. Loader (`--workers`): builds a synthetic corpus (text 30 tokens, 64 x 342 face frames, 64 x 130
   speech frames per utterance, float16 features as `build-feat-db` stores them by default) with
   DbWriter, then reads one epoch (or `--seconds`) through JoinedDataset + TokenBucketBatchSampler +
   Collator for each worker count: batches/s, samples/s and the databases' size on disk.
2. Mix (`--rounds`): the pretraining data path of a mix of objectives (one TaskStream per objective:
   sampler, join, collate, the task's `prepare`, objectives drawn by ratio as the loop draws them)
   with each objective's DataLoader workers from ONE budget per rank (`num_workers: auto` on a GPU:
   cores - 1 shared by ratio, `train/loaders.py: share_workers`) against the former rule,
   min(8, cores - 1) workers for every objective, and none at all. Contenders run round by round in one process
   (each round starts its loaders fresh, one contender's processes at a time); min / median of the
   rounds' steps/s and the ratio of medians.
3. MELD lengths (`--meld DIR`, the folder of MELD's csv files): transcripts through the real
   tokenizer (+ [CLS]/[SEP], at most 64 + 2), face and speech frames from each utterance's
   duration (`--face-fps`, `--speech-fps`, at most 64: the data config's defaults), cut into one epoch of
   token-bucket batches: positions per batch with packing off and on (and the packing plan's time),
   and with `pad_multiple` 1 and 8 the padding share and the graphs Dynamo compiles for a tiny
   backbone over that epoch's shapes.

    python benchmarks/data_throughput.py                  # 100k utterances, 0/2/8 workers
    python benchmarks/data_throughput.py --quick          # 5k utterances, 0/2 workers, 3 rounds
    python benchmarks/data_throughput.py --quick --meld ../shared/data/meld --json out.json

Figures are with a warm page cache (the databases were just written), which is the steady
state of a multi-epoch run on a machine whose RAM holds the corpus. Startup (worker fork and
first batch) is reported apart from the steady rate.
"""

from __future__ import annotations

import argparse
import csv
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
from uniter3m.data.packing import pack_plan
from uniter3m.data.sampler import TokenBucketBatchSampler
from uniter3m.data.store import DbWriter
from uniter3m.data.tokenization import SpecialTokens, encode_text, load_tokenizer
from uniter3m.tasks.base import TaskContext, build_task
from uniter3m.train.config import BatchingConfig, default_text_model
from uniter3m.train.loaders import TaskStream, share_workers

TXT_LEN, FRAMES, FACE_DIM, SPEECH_DIM = 30, 64, 342, 130
BERT_SPECIAL = SpecialTokens(cls_id=101, sep_id=102, mask_id=103, pad_id=0, unk_id=100, vocab_size=30522)
BANK = 64  # distinct random feature arrays, reused (content does not change read cost)
MIX = (
    ("mlm", 2.0),
    ("face_mrfr", 1.0),
    ("speech_mrfr", 1.0),
    ("face_fom", 0.5),
    ("speech_fom", 0.5),
    ("itm", 1.0),
)


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


def worker_rules(cores: int, ratios: list[float]) -> dict[str, list[int]]:
    """Each objective's workers on a GPU machine with `cores` CPUs and one rank: one budget shared
    by ratio (`num_workers: auto`), the former rule, min(8, cores - 1) for every objective, and none
    (every batch prepared in the main process)."""
    budget = BatchingConfig(num_workers="auto").workers_for("cuda", 1, cores=cores)
    return {
        "budget": share_workers(budget, ratios),
        "per objective": [max(1, min(8, cores - 1))] * len(ratios),
        "none": [0] * len(ratios),
    }


def measure_mix(ds: JoinedDataset, workers: list[int], max_tokens: int, steps: int, seed: int) -> float:
    """Steps/s of the mix's data: every objective's stream started and its first batch taken, then
    `steps` batches drawn by ratio (the loop's rule), then the workers stopped."""
    context = TaskContext(special=BERT_SPECIAL)
    collator = Collator(BERT_SPECIAL)
    streams = [
        TaskStream(
            build_task(name, context),
            ds,
            collator,
            task_index=i,
            seed=0,
            max_tokens=max_tokens,
            num_workers=n,
        )
        for i, ((name, _), n) in enumerate(zip(MIX, workers, strict=True))
    ]
    ratios = np.array([r for _, r in MIX])
    order = np.random.default_rng(seed).choice(len(streams), size=steps, p=ratios / ratios.sum())
    try:
        for stream in streams:
            stream.next()
        start = time.perf_counter()
        for i in order:
            streams[i].next()
        return steps / (time.perf_counter() - start)
    finally:
        for stream in streams:
            stream.close()


def _seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    sec, ms = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(sec) + int(ms) / 1000


def meld_lengths(
    meld_dir: Path,
    tokenizer: object,
    max_txt_len: int = 64,
    max_frames: int = 64,
    face_fps: float = 8.0,
    speech_fps: float = 16.0,
) -> np.ndarray:
    """(N, 3) stream lengths of MELD's training utterances as the collator sees them: text tokens of
    the real tokenizer + [CLS]/[SEP], then face and speech frames at the given rates over each
    utterance's duration (at least 1, at most `max_frames`)."""
    with (meld_dir / "train_sent_emo.csv").open(encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = encode_text(tokenizer, [r["Utterance"] for r in rows])["input_ids"]
    text = np.array([min(len(t), max_txt_len) + 2 for t in ids])
    seconds = np.array([max(_seconds(r["EndTime"]) - _seconds(r["StartTime"]), 0.0) for r in rows])
    face, speech = (
        np.clip(np.round(fps * seconds), 1, max_frames).astype(np.int64) for fps in (face_fps, speech_fps)
    )
    return np.stack([text, face, speech], axis=1)


def epoch_batches(
    parts: np.ndarray, max_tokens: int, pad_multiple: int
) -> list[tuple[np.ndarray, tuple[int, ...]]]:
    """Every batch of one epoch as (its (B, L) joint keep-mask, each stream's width): a stream is
    padded to its longest item rounded up to `pad_multiple`, as the sampler budgets and the collator pads."""
    sampler = TokenBucketBatchSampler(parts, max_tokens, seed=0, pad_multiple=pad_multiple)
    out = []
    for batch in sampler.batches(0):
        lengths = parts[batch]
        widths = tuple(int(w) for w in -(-lengths.max(axis=0) // pad_multiple) * pad_multiple)
        mask = np.concatenate([np.arange(w)[None] < lengths[:, [s]] for s, w in enumerate(widths)], axis=1)
        out.append((mask, widths))
    return out


def packing_figures(masks: list[np.ndarray], multiple: int) -> dict[str, float]:
    """Positions per batch: padded (packing off), packed (on: rows of `pack_plan`) and real."""
    padded = np.array([m.size for m in masks])
    real = np.array([m.sum() for m in masks])
    packed, plan_ms = [], []
    for m in masks:
        start = time.perf_counter()
        packed.append(pack_plan(m, multiple)["pack_doc"].numel())
        plan_ms.append(1000 * (time.perf_counter() - start))
    packed = np.array(packed)
    return {
        "batches": len(masks),
        "padded_per_batch": float(padded.mean()),
        "packed_per_batch": float(packed.mean()),
        "real_per_batch": float(real.mean()),
        "packed_over_padded": float(packed.sum() / padded.sum()),
        "padding_share_off": float(1 - real.sum() / padded.sum()),
        "padding_share_on": float(1 - real.sum() / packed.sum()),
        "plan_ms_median": float(np.median(plan_ms)),
    }


def graph_count(batches: list[tuple[np.ndarray, tuple[int, ...]]]) -> int:
    """Graphs Dynamo compiles (its tracing, backend "eager") for a tiny backbone over an epoch of shapes."""
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics

    from uniter3m.model.config import UniterConfig
    from uniter3m.model.uniter import UniterModel

    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        face={"feat_dim": 6, "max_frames": 128},
        speech={"feat_dim": 5, "max_frames": 128, "position": "sinusoidal"},
    )
    model = torch.compile(UniterModel(config).eval(), backend="eager")
    torch._dynamo.reset()
    clear_compilation_metrics()
    with torch.no_grad():
        for mask, (t, v, a) in batches:
            keep = torch.from_numpy(mask)
            b = keep.shape[0]
            model(
                input_ids=torch.randint(0, 1000, (b, t)),
                attention_mask=keep[:, :t],
                face_feat=torch.randn(b, v, 6),
                face_mask=keep[:, t : t + v],
                speech_feat=torch.randn(b, a, 5),
                speech_mask=keep[:, t + v :],
                padded=True,
            )
    return sum(1 for m in get_compilation_metrics() if m.fail_type is None)


def meld_figures(parts: np.ndarray, max_tokens: int) -> dict[int, dict[str, float]]:
    """Packing and padding figures of one epoch of `parts` for pad_multiple 1 and 8."""
    out = {}
    for multiple in (1, 8):
        batches = epoch_batches(parts, max_tokens, multiple)
        out[multiple] = {
            **packing_figures([m for m, _ in batches], multiple),
            "shapes": len({(m.shape[0], *w) for m, w in batches}),
            "graphs": graph_count(batches),
        }
    return out


def affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="loader,mix,meld", help="which of loader, mix, meld to run")
    parser.add_argument("--n", type=int, default=None, help="utterances (default 100000, --quick 5000)")
    parser.add_argument("--quick", action="store_true", help="5000 utterances, workers 0 and 2, 3 rounds")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 0 2 8)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=64 * (TXT_LEN + 2 + 2 * FRAMES),
        help="batch budget (default: 64 items)",
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="cap on the timed part of each run")
    parser.add_argument("--normalize", action="store_true", help="also normalise features (mean/std)")
    parser.add_argument("--rounds", type=int, default=None, help="mix: rounds (default 5, --quick 3)")
    parser.add_argument(
        "--mix-steps", type=int, default=None, help="mix: steps per round (default 300, --quick 60)"
    )
    parser.add_argument(
        "--cores", type=int, default=None, help="mix: the cores the budget counts (default: affinity)"
    )
    parser.add_argument(
        "--meld", type=Path, default=None, help="MELD folder (train_sent_emo.csv); no folder: no meld part"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the default text model)"
    )
    parser.add_argument("--meld-max-tokens", type=int, default=4096, help="meld: the batch budget")
    parser.add_argument("--face-fps", type=float, default=8.0, help="meld: face frames per second")
    parser.add_argument("--speech-fps", type=float, default=16.0, help="meld: speech frames per second")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to build the dbs (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases (and reuse them if present)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    n = args.n or (5000 if args.quick else 100_000)
    workers = args.workers or ([0, 2] if args.quick else [0, 2, 8])
    rounds = args.rounds or (3 if args.quick else 5)
    mix_steps = args.mix_steps or (60 if args.quick else 300)
    cores = args.cores or affinity()
    torch.set_num_threads(1)
    results: dict[str, object] = {"cpus": affinity(), "torch": torch.__version__}

    if parts & {"loader", "mix"}:
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
            if "loader" in parts:
                runs = [measure(ds, w, args.max_tokens, args.seconds) for w in workers]
                results.update(n=n, build_s=build_s, join_s=join_s, sizes=sizes, runs=runs)
                print_loader(n, build_s, join_s, workdir, sizes, runs)
            if "mix" in parts:
                rules = worker_rules(cores, [r for _, r in MIX])
                rates: dict[str, list[float]] = {name: [] for name in rules}
                for r in range(rounds):  # alternate the order: neither rule always runs first
                    for name in list(rules)[:: 1 if r % 2 == 0 else -1]:
                        rates[name].append(measure_mix(ds, rules[name], args.max_tokens, mix_steps, seed=r))
                results["mix"] = {"cores": cores, "steps": mix_steps, "workers": rules, "steps_per_s": rates}
                print_mix(cores, mix_steps, rules, rates)
        finally:
            if not args.keep and args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)

    if "meld" in parts and args.meld is not None:
        tokenizer = load_tokenizer(args.tokenizer or default_text_model())
        lengths = meld_lengths(args.meld, tokenizer, face_fps=args.face_fps, speech_fps=args.speech_fps)
        figures = meld_figures(lengths, args.meld_max_tokens)
        results["meld"] = {
            "utterances": len(lengths),
            "max_tokens": args.meld_max_tokens,
            "pad_multiple": figures,
        }
        print_meld(lengths, args, figures)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_loader(n: int, build_s: float, join_s: float, workdir: Path, sizes: dict, runs: list[dict]) -> None:
    print(
        f"\ncorpus: {n} utterances (text {TXT_LEN}, face {FRAMES}x{FACE_DIM}, speech {FRAMES}x{SPEECH_DIM}, float16)"
    )
    print(f"machine: {affinity()} cpus, torch {torch.__version__}, python {sys.version.split()[0]}")
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


def print_mix(cores: int, steps: int, rules: dict[str, list[int]], rates: dict[str, list[float]]) -> None:
    mix = ", ".join(f"{name} {ratio:g}" for name, ratio in MIX)
    print(f"\nmix ({mix}), {steps} steps a round, workers for {cores} cores and one rank:")
    print("| workers | processes | steps/s min | steps/s median | vs budget |")
    print("|---|---:|---:|---:|---:|")
    first = float(np.median(rates["budget"]))
    for name, counts in rules.items():
        median = float(np.median(rates[name]))
        print(
            f"| {name} {counts} | {sum(counts)} | {min(rates[name]):.1f} | {median:.1f} | {median / first:.2f}x |"
        )


def print_meld(lengths: np.ndarray, args: argparse.Namespace, figures: dict[int, dict[str, float]]) -> None:
    med = np.median(lengths, axis=0)
    print(
        f"\nMELD train: {len(lengths)} utterances, median text {med[0]:.0f} tokens, face {med[1]:.0f} and "
        f"speech {med[2]:.0f} frames ({args.face_fps:g} / {args.speech_fps:g} per second); "
        f"batches of {args.meld_max_tokens} positions, one epoch"
    )
    print(
        "| pad_multiple | batches | positions/batch off | packed | real | packed/off | padding off | "
        "padding packed | plan (ms) | shapes | graphs |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, f in figures.items():
        print(
            f"| {m} | {f['batches']} | {f['padded_per_batch']:.0f} | {f['packed_per_batch']:.0f} | "
            f"{f['real_per_batch']:.0f} | {f['packed_over_padded']:.3f} | {f['padding_share_off']:.1%} | "
            f"{f['padding_share_on']:.1%} | {f['plan_ms_median']:.2f} | {f['shapes']} | {f['graphs']} |"
        )


if __name__ == "__main__":
    sys.exit(main())
