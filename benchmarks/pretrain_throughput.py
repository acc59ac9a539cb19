"""Throughput of the real `pretrain` path: databases -> DataLoader workers -> task mix -> step.

Builds a SYNTHETIC corpus with a realistic length distribution (log-normal utterance durations;
words, face frames and speech frames follow the duration), builds its databases with the real
commands, then runs `run_pretrain` (the code behind `uniter3m pretrain`) on the chosen model size
and reports, over the steps after warm-up (the JSONL log's windows):
- samples/s and positions/s (text tokens + frames, padding excluded);
- MFU: 6 x non-embedding parameters x positions/s (+ the attention term) against a dense matmul
  measured in the same run in the same precision (bf16 on GPU, fp32 on CPU);
- the share of step time the main rank spent waiting for the next batch.

GPU:   python benchmarks/pretrain_throughput.py --size base --device cuda --utterances 20000 --steps 300
smoke: python benchmarks/pretrain_throughput.py --size tiny --device cpu
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
    from uniter3m.recipes.pretrain.demo import build_corpus_dbs

    from uniter3m.data.synthetic import SyntheticSpec, generate_corpus

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--utterances", type=int, default=400)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=2048, help="padded positions per batch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the corpus here (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from uniter3m.recipes.pretrain.demo import default_tokenizer
    from uniter3m.recipes.pretrain.pretrain import run_pretrain

    from uniter3m.train.logs import read_metrics

    tokenizer = default_tokenizer()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pretrain_bench_"))
    t0 = time.perf_counter()
    dbs = build_corpus(work, args.size, args.utterances, tokenizer)
    build_s = time.perf_counter() - t0
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run_pretrain(pretrain_config(args, dbs, out, tokenizer))
    run_s = time.perf_counter() - t0

    windows = [r for r in read_metrics(out, "train")][1:]  # the first window holds warm-up
    if not windows:
        print("not enough steps for a measurement after warm-up: raise --steps", file=sys.stderr)
        return 1
    samples = float(np.mean([w["samples_per_s"] for w in windows]))
    positions = float(np.mean([w["positions_per_s"] for w in windows]))
    wait = float(np.mean([w["data_wait_share"] for w in windows]))
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu and args.precision in ("auto", "bf16") else torch.float32
    peak = measure_peak_flops(device, dtype, 8192 if on_gpu else 1024)
    mean_len = positions / samples
    per_position, n_params = model_flops_per_position(args.size, mean_len)
    achieved = per_position * positions
    result = {
        "size": args.size,
        "device": torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "precision": args.precision,
        "utterances": args.utterances,
        "steps": args.steps,
        "workers": args.workers,
        "max_tokens": args.max_tokens,
        "mean_positions_per_sample": round(mean_len, 1),
        "samples_per_s": round(samples, 1),
        "positions_per_s": round(positions, 0),
        "model_tflops": round(achieved / 1e12, 3),
        "peak_matmul_tflops": round(peak / 1e12, 3),
        "mfu": round(achieved / peak, 4),
        "data_wait_share": round(wait, 4),
        "non_embedding_params": n_params,
        "build_s": round(build_s, 1),
        "run_s": round(run_s, 1),
    }
    print("| metric | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
