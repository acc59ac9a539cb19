"""Time one training step of the model: forward + backward + AdamW, in bf16 autocast.

    python benchmarks/model_step.py                      # base, B=128, text 30 + face 64x342 + speech 64x768, cuda
    python benchmarks/model_step.py --device cpu --size tiny --batch 8 --steps 3   # smoke check

The contenders (ours eager, ours compiled, ours packed on ragged batches, HF `BertModel` with SDPA
eager and compiled, at the same total sequence length) are timed ROUND BY ROUND in one process:
each round runs every contender for `--steps` steps, so a busy machine slows them alike; the
table gives min and median ms/step over all rounds and the ratio of medians to HF SDPA. MFU is
against a bf16 matmul measured in the same run and counts REAL (unpadded) positions only. FLOPs count matmuls only: 6 x (weights in matmuls) x (tokens they see),
plus attention 12 x B x L^2 x H per layer (QK^T and AV, forward and backward); embeddings
lookups, LayerNorm and softmax are not counted, so MFU is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", help="configs/model/SIZE.json, or a path to a model config")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--text-len", type=int, default=30)
    p.add_argument("--face-frames", type=int, default=64)
    p.add_argument("--speech-frames", type=int, default=64)
    p.add_argument(
        "--ragged", action="store_true", help="pad streams to random lengths (mask path, not flash)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds; contenders alternate within each")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--contenders",
        default="ours,ours-compiled,ours-packed,hf,hf-compiled",
        help="comma-separated: ours, ours-compiled (whole model), ours-packed (ragged batch, packed rows), "
        "ours-fused / ours-foreach (AdamW fused into one kernel / multi-tensor; ours = the library's "
        "default, fused on CUDA only), hf, hf-compiled",
    )
    p.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend (aot_eager: a CPU dry run)"
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def load_config(size: str):
    from uniter3m.model.config import UniterConfig

    path = Path(size) if size.endswith(".json") else REPO / "configs" / "model" / f"{size}.json"
    return UniterConfig.from_json(path)


def make_inputs(cfg, args, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = args.batch
    inputs = {
        "input_ids": torch.randint(1000, cfg.vocab_size, (b, args.text_len), generator=g),
        "attention_mask": torch.ones(b, args.text_len, dtype=torch.bool),
    }
    for name, frames in (("face", args.face_frames), ("speech", args.speech_frames)):
        dim = cfg.stream(name).feat_dim
        if frames and dim:
            inputs[f"{name}_feat"] = torch.randn(b, frames, dim, generator=g)
            inputs[f"{name}_mask"] = torch.ones(b, frames, dtype=torch.bool)
    if args.ragged:
        for key in [k for k in inputs if k.endswith("mask")]:
            n = inputs[key].shape[1]
            keep = torch.randint(1, n + 1, (b,), generator=g)
            inputs[key] = torch.arange(n)[None, :] < keep[:, None]
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def matmul_flops(cfg, batch: int, lengths: dict[str, int], frame_dims: dict[str, int]) -> float:
    """Training FLOPs of one step (matmuls only, see the module docstring)."""
    h, i, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    seq = sum(lengths.values())
    per_layer_weights = 4 * h * h + 2 * h * i
    flops = 6 * per_layer_weights * n_layers * batch * seq
    flops += 12 * batch * seq * seq * h * n_layers  # attention scores and weighted values
    flops += 6 * h * h * batch  # pooler
    for name, dim in frame_dims.items():
        flops += 6 * dim * h * batch * lengths[name]  # frame input linears (+ projection when configured)
        if cfg.stream(name).projection:
            flops += 6 * h * h * batch * lengths[name]
    return float(flops)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """TFLOP/s of a large square matmul in `dtype`: the roof the MFU is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3
    for _ in range(2):
        a @ b
    secs = timed(lambda: a @ b, reps, device)
    return 2 * n**3 / statistics.median(secs) / 1e12


def timed(fn: Callable[[], object], reps: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def train_step_fn(
    model, inputs: dict, device: torch.device, dtype: torch.dtype, forward: Callable, fused: bool | None
):
    """One step with the library's AdamW (`fused` None: its default, fused on CUDA only)."""
    from uniter3m.train.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-4, weight_decay=0.01, device=device, fused=fused)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            hidden, pooled = forward(model, inputs)
            loss = hidden.float().square().mean() + pooled.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_ours(
    cfg, args, device, dtype, compiled: bool = False, packed: bool = False, fused: bool | None = None
) -> dict:
    from uniter3m.model.uniter import UniterModel

    torch.manual_seed(0)
    model = UniterModel(cfg).to(device).train()
    if packed:
        from uniter3m.data.packing import joint_mask, pack_plan

        ragged = argparse.Namespace(**{**vars(args), "ragged": True})
        inputs = make_inputs(cfg, ragged, torch.device("cpu"))
        plan = pack_plan(joint_mask(inputs, [k for k in ("face_mask", "speech_mask") if k in inputs]))
        inputs = {k: v.to(device) for k, v in {**inputs, **plan}.items()}
    else:
        inputs = make_inputs(cfg, args, device)
    inputs["padded"] = any(not bool(v.all()) for k, v in inputs.items() if k.endswith("mask"))
    runner = torch.compile(model, backend=args.compile_backend) if compiled else model

    def forward(m, x):
        out = runner(**x)
        return out.last_hidden_state, out.pooler_output

    lengths = {"text": args.text_len}
    dims = {}
    for name in ("face", "speech"):
        if f"{name}_feat" in inputs:
            lengths[name] = inputs[f"{name}_feat"].shape[1]
            dims[name] = cfg.stream(name).feat_dim
    flops = matmul_flops(cfg, args.batch, lengths, dims)
    name = "uniter3m" + (" compiled" if compiled else "") + (" packed (ragged batch)" if packed else "")
    name += {None: "", True: ", fused AdamW", False: ", foreach AdamW"}[fused]
    return prepare(name, model, inputs, forward, flops, args, device, dtype, fused)


def run_hf(cfg, args, device, dtype, seq: int, compiled: bool = False) -> dict:
    from transformers import BertConfig, BertModel

    hf_cfg = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(cfg.max_position_embeddings, seq),
        hidden_dropout_prob=cfg.hidden_dropout_prob,
        attention_probs_dropout_prob=cfg.attention_probs_dropout_prob,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = BertModel(hf_cfg).to(device).train()
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF BertModel runs {model.config._attn_implementation!r} attention, not sdpa")
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, cfg.vocab_size, (args.batch, seq), generator=g).to(device),
        "attention_mask": torch.ones(args.batch, seq, dtype=torch.long, device=device),
    }

    runner = torch.compile(model, backend=args.compile_backend) if compiled else model

    def forward(m, x):
        out = runner(**x)
        return out.last_hidden_state, out.pooler_output

    flops = matmul_flops(cfg, args.batch, {"text": seq}, {})
    name = "HF BertModel (sdpa)" + (" compiled" if compiled else "")
    return prepare(name, model, inputs, forward, flops, args, device, dtype)


def prepare(name, model, inputs, forward, flops, args, device, dtype, fused: bool | None = None) -> dict:
    """A contender: its warmed-up step function and what it computes."""
    step = train_step_fn(model, inputs, device, dtype, forward, fused)
    for _ in range(args.warmup):
        step()
    real = sum(int(v.sum()) for k, v in inputs.items() if k.endswith("mask") and v.dtype == torch.bool)
    real = real or args.batch * sum(v.shape[1] for k, v in inputs.items() if k.endswith("mask"))
    return {
        "model": name,
        "step": step,
        "seq_len": sum(v.shape[1] for k, v in inputs.items() if k.endswith("mask")),
        "real_positions": real,
        "flops": flops,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "times": [],
    }


def run_rounds(contenders: list[dict], args, device) -> None:
    """Every round times every contender for `args.steps` steps, in a rotating order."""
    for r in range(args.rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for c in order:
            c["times"] += timed(c["step"], args.steps, device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu for a smoke check", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = load_config(args.size)
    peak = measure_matmul_peak(device, dtype)
    contenders = build_contenders(cfg, args, device, dtype)
    run_rounds(contenders, args, device)
    baseline = next((c for c in contenders if c["model"].startswith("HF")), contenders[0])
    base_median = statistics.median(baseline["times"])
    rows = []
    for c in contenders:
        med, low = statistics.median(c["times"]), min(c["times"])
        # MFU on real positions: the FLOPs of the unpadded work over the measured time
        useful = c["flops"] * c["real_positions"] / (args.batch * c["seq_len"])
        rows.append(
            {
                "model": c["model"],
                "seq_len": c["seq_len"],
                "ms_min": 1000 * low,
                "ms_median": 1000 * med,
                "samples_per_s": args.batch / med,
                "tflops": c["flops"] / med / 1e12,
                "mfu_real": useful / med / 1e12 / peak,
                "ratio_to_hf_sdpa": base_median / med,
                "params_m": c["params_m"],
            }
        )
    title = (
        f"{args.size}: B={args.batch}, text {args.text_len} + face {args.face_frames} + speech "
        f"{args.speech_frames} frames, {args.dtype}, {device.type}"
        f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}; "
        f"{args.rounds} rounds x {args.steps} steps, interleaved; matmul roof {peak:.3g} TFLOP/s"
    )
    print(title)
    print(
        "| contender | seq | ms/step min | ms/step median | samples/s | TFLOP/s | MFU (real positions) | speed vs HF SDPA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['seq_len']} | {r['ms_min']:.1f} | {r['ms_median']:.1f} | "
            f"{r['samples_per_s']:.0f} | {r['tflops']:.3g} | {r['mfu_real']:.2g} | {r['ratio_to_hf_sdpa']:.2f}x |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"title": title, "matmul_tflops": peak, "rows": rows}, indent=2) + "\n"
        )
    return 0


def build_contenders(cfg, args, device, dtype) -> list[dict]:
    wanted = [c.strip() for c in args.contenders.split(",") if c.strip()]
    out = []
    ours = None
    for name in wanted:
        if name in ("ours", "ours-compiled", "ours-packed"):
            out.append(
                run_ours(
                    cfg, args, device, dtype, compiled=name == "ours-compiled", packed=name == "ours-packed"
                )
            )
            ours = ours or out[-1]
        elif name in ("ours-fused", "ours-foreach"):
            out.append(run_ours(cfg, args, device, dtype, fused=name == "ours-fused"))
            ours = ours or out[-1]
        elif name in ("hf", "hf-compiled"):
            seq = (ours or run_ours(cfg, args, device, dtype))["seq_len"]
            out.append(run_hf(cfg, args, device, dtype, seq, compiled=name == "hf-compiled"))
        else:
            raise SystemExit(
                f"unknown contender {name!r}; use ours, ours-compiled, ours-packed, ours-fused, "
                "ours-foreach, hf, hf-compiled"
            )
    return out


if __name__ == "__main__":
    sys.exit(main())
