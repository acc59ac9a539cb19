"""Checks that need a CUDA GPU (run by benchmarks/gpu_suite.sh; skipped elsewhere, with the reason).

bf16 and fp16 + GradScaler training steps of a real pretraining run, the compiled backbone equal
to the eager one, and packed rows equal to the unpacked model, on the device.

`gpu_suite.sh --dry-run` (UNITER3M_GPU_DRY_RUN=1) runs them on the CPU from the installed package:
what can fail there (imports, fixtures, files, the bundle's tokenizer) fails before a GPU is spent;
fp16 (loss scaling needs CUDA) is skipped and compiling uses `aot_eager` (no code generation).
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DRY_RUN = DEVICE == "cpu" and bool(os.environ.get("UNITER3M_GPU_DRY_RUN"))
COMPILE_BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not DRY_RUN,
    reason="no CUDA device: run benchmarks/gpu_suite.sh on a GPU (--dry-run: the same steps on the CPU)",
)


def _model(**streams):
    from uniter3m.model.config import UniterConfig
    from uniter3m.model.uniter import UniterModel

    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        face={"feat_dim": 16},
        speech={"feat_dim": 8, "position": "sinusoidal"},
    )
    return UniterModel(config).to(DEVICE).eval()


def _inputs(padded: bool = True):
    from tests.support.batches import ragged_inputs

    inputs = ragged_inputs(3)
    inputs["face_feat"] = torch.randn(*inputs["face_feat"].shape[:2], 16)
    inputs["speech_feat"] = torch.randn(*inputs["speech_feat"].shape[:2], 8)
    inputs["input_ids"] = inputs["input_ids"] % 1000
    return inputs


def test_compiled_backbone_equals_eager_on_the_gpu():
    model = _model()
    inputs = {k: v.to(DEVICE) for k, v in _inputs().items()}
    with torch.no_grad():
        eager = model(**inputs, padded=True)
        compiled = torch.compile(model, backend=COMPILE_BACKEND)(**inputs, padded=True)
    real = eager.attention_mask
    assert torch.allclose(eager.last_hidden_state[real], compiled.last_hidden_state[real], atol=1e-4)


def test_packed_equals_unpacked_on_the_gpu():
    from uniter3m.data.packing import joint_mask, pack_plan

    model = _model()
    cpu = _inputs()
    plan = pack_plan(joint_mask(cpu, ["face_mask", "speech_mask"]))
    inputs = {k: v.to(DEVICE) for k, v in cpu.items()}
    with torch.no_grad():
        plain = model(**inputs)
        packed = model(**inputs, **{k: v.to(DEVICE) for k, v in plan.items()})
    real = plain.attention_mask
    assert torch.allclose(plain.last_hidden_state[real], packed.last_hidden_state[real], atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pretraining_steps_in_mixed_precision(precision, tmp_path, request):
    from tests.support.runs import pretrain_config
    from uniter3m.train.logs import read_metrics
    from uniter3m.train.pretrain import run_pretrain

    if precision == "fp16" and DEVICE != "cuda":
        pytest.skip("fp16 loss scaling needs CUDA")
    dbs = request.getfixturevalue("tiny_dbs")
    cfg = pretrain_config(dbs, tmp_path / precision, steps=8, log_every=2, device=DEVICE, precision=precision)
    cfg["batching"].update(packing=True, pad_multiple=8)
    run_pretrain(cfg)
    rows = read_metrics(tmp_path / precision, "train")
    losses = [v for r in rows for k, v in r.items() if k.startswith("loss/")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_side_stream_prefetch_trains_as_fetching_on_demand(tmp_path, request):
    """The next batch copied on a side CUDA stream gives the weights of on-demand fetching (fp32;
    atomics in some CUDA backward kernels allow a last-bit difference)."""
    from safetensors.torch import load_file

    from tests.support.runs import pretrain_config
    from uniter3m.train.checkpoint import find_resume
    from uniter3m.train.pretrain import run_pretrain

    dbs = request.getfixturevalue("tiny_dbs")
    weights = []
    for prefetch in (False, True):
        out = tmp_path / f"prefetch_{prefetch}"
        cfg = pretrain_config(dbs, out, steps=8, device=DEVICE, precision="fp32", grad_accum=2)
        cfg["batching"]["prefetch"] = prefetch
        run_pretrain(cfg)
        weights.append(load_file(str(find_resume(out, "auto") / "model" / "model.safetensors")))
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-5) for k in weights[0])
