"""The engine pieces on their own: checkpoints (atomic, complete, kill-safe), RNG, schedule, optimiser
groups, precision, the distributed helpers in one process, and the pretraining config's errors."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.support import REPO
from uniter3m.errors import ConfigError, UserError
from uniter3m.train import checkpoint as ckpt
from uniter3m.train.distributed import Backend, detect_launcher, init_backend, unwrap
from uniter3m.train.nonfinite import NonfiniteSteps
from uniter3m.train.optim import (
    build_optimizer,
    clip_gradients,
    no_decay_parameter_names,
    warmup_linear_schedule,
)
from uniter3m.train.precision import Precision, resolve_precision
from uniter3m.train.prefetch import batch_size_of, positions_of


class TinyNet(nn.Module):
    """A stand-in model: linear, LayerNorm, linear (weights, biases and norms to group)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.inp(x)))


def _train_a_bit(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_roundtrip_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = build_optimizer(model, 1e-2)
    sched = warmup_linear_schedule(opt, 2, 10)
    _train_a_bit(model, opt)
    sched.step()
    random.seed(1)
    np.random.seed(2)
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.capture_rng_state()}
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))
    path = ckpt.save_checkpoint(tmp_path, 7, model, state, keep_last=2)
    assert path.name == "step_000007" and ckpt.is_complete(path)

    fresh = TinyNet()
    ckpt.load_model_weights(fresh, path / "model")
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    loaded = ckpt.load_trainer_state(path)
    assert loaded["step"] == 7
    opt2 = build_optimizer(fresh, 1e-2)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    ckpt.restore_rng_state(loaded["rng"])
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1]
    assert torch.equal(draws[2], expected_draws[2])


def test_resume_auto_ignores_incomplete_and_keeps_last_k(tmp_path):
    model = TinyNet()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, {"x": torch.zeros(2)}, keep_last=2)
    root = tmp_path / ckpt.CHECKPOINT_DIR
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    # a newer folder without its manifest (a writer died before finishing) is ignored ...
    broken = root / "step_000005"
    (broken / "model").mkdir(parents=True)
    (broken / "trainer_state.pt").write_bytes(b"partial")
    # ... and so is one whose file is shorter than its manifest says (torn write)
    torn = root / "step_000004"
    state_file = torn / ckpt.TRAINER_STATE
    state_file.write_bytes(state_file.read_bytes()[:10])
    assert ckpt.find_resume(tmp_path, "auto") == root / "step_000003"
    # `latest` points at the torn one; auto still falls back
    assert json.loads((root / ckpt.LATEST).read_text())["dir"] == "step_000004"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        ckpt.find_resume(tmp_path, str(broken))
    assert ckpt.find_resume(tmp_path / "nothing-here", "auto") is None
    assert ckpt.find_resume(tmp_path, None) is None


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from uniter3m.train.checkpoint import save_checkpoint
    out = sys.argv[1]
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    big = torch.randn(2_000_000)  # ~8 MB of trainer state: each write takes a while
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step))
        print(f"writing {step}", flush=True)
        save_checkpoint(out, step, model, {"big": big, "marker": torch.tensor(step)}, keep_last=3)
        print(f"done {step}", flush=True)
    """
)


def test_sigkill_during_checkpoint_write_leaves_a_usable_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        deadline = time.time() + 60
        # wait until step 2 is complete and step 3 has started, then kill mid-write
        for line in proc.stdout:
            if line.strip() == "writing 3" or time.time() > deadline:
                break
        time.sleep(random.Random(0).uniform(0.0, 0.02))
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    found = ckpt.find_resume(out, "auto")
    assert found is not None and found.name in {"step_000002", "step_000003"}
    state = ckpt.load_trainer_state(found)
    step = int(found.name.split("_")[1])
    assert int(state["marker"]) == step == state["step"]
    model = nn.Linear(256, 256)
    ckpt.load_model_weights(model, found / "model")
    assert torch.all(model.weight == float(step))
    # the next save cleans the dead writer's temp folder
    ckpt.save_checkpoint(out, 99, model, {"x": torch.zeros(1)}, keep_last=0)
    assert not [p for p in (out / ckpt.CHECKPOINT_DIR).iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------------------------ optimiser
def test_no_weight_decay_on_biases_and_layernorm():
    model = TinyNet()
    assert no_decay_parameter_names(model) == {"inp.bias", "norm.weight", "norm.bias", "out.bias"}
    opt = build_optimizer(model, 1e-3, weight_decay=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.inp.weight), id(model.out.weight)}
    with pytest.raises(ConfigError, match="learning rate"):
        build_optimizer(model, -1.0)


def test_tied_parameters_are_optimised_once():
    emb = nn.Embedding(10, 4)
    model = nn.ModuleDict({"emb": emb, "dec": nn.Linear(4, 10)})
    model["dec"].weight = emb.weight
    opt = build_optimizer(model, 1e-3)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == 2


def test_warmup_then_linear_decay():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_linear_schedule(opt, warmup_steps=4, total_steps=12, final_ratio=0.0)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.0) and lrs[1] == pytest.approx(0.25) and lrs[3] == pytest.approx(0.75)
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[8] == pytest.approx(0.5)
    assert lrs[12] == pytest.approx(0.0) and lrs[13] == pytest.approx(0.0)
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:5]))


def test_the_schedule_is_transformers_and_a_floor_stops_the_same_line():
    from transformers import get_linear_schedule_with_warmup

    def lrs(make):
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(14):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: warmup_linear_schedule(o, 4, 12))
    assert ours == lrs(lambda o: get_linear_schedule_with_warmup(o, 4, 12))
    floored = lrs(lambda o: warmup_linear_schedule(o, 4, 12, final_ratio=0.1))
    assert floored[:5] == ours[:5] and floored[12] == pytest.approx(0.1) and floored[13] == pytest.approx(0.1)


def test_clip_gradients_reports_norm_and_keeps_nonfinite():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert float(clip_gradients([p], 1.0)) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([float("nan"), 1.0])
    assert not torch.isfinite(clip_gradients([p], 1.0))


# the same sequence of steps (None = finite, "loss" / "norm" = which one was not) through both paths
_STEPS = [None, "loss", "norm", None, "loss", "loss", "norm", None, "loss"]


def test_nonfinite_policy_is_one_rule_for_the_host_and_the_device_path(capsys):
    host = NonfiniteSteps(limit=4, report=True)
    for step, what in enumerate(_STEPS, 1):
        host.count(what is not None, step, "mlm")
    host_lines = capsys.readouterr().err.splitlines()
    device = NonfiniteSteps(limit=4, report=True)
    for step, what in enumerate(_STEPS, 1):
        device.count_on_device(torch.tensor(what is not None), "mlm")
        if step % 4 == 0 or step == len(_STEPS):  # read at log steps only
            device.settle(step)
    device_lines = capsys.readouterr().err.splitlines()
    assert host.state_dict() == device.state_dict() == {"skipped_nonfinite": 6, "nonfinite_in_a_row": 1}
    assert len(host_lines) == 6 and host_lines[0] == (
        "step 2 (task mlm): 1 step(s) with a non-finite loss or gradient norm skipped "
        "(1 in a row, 1 in this run; the run stops at 4 in a row)"
    )
    assert len(device_lines) == 3 and device_lines[1] == (
        "step 8 (task mlm): 3 step(s) with a non-finite loss or gradient norm skipped "
        "(0 in a row, 5 in this run; the run stops at 4 in a row)"
    )
    # a run of 3 between two reads stops the device path too, though a finite step ended it before the read
    for policy, settle in ((NonfiniteSteps(3, report=False), False), (NonfiniteSteps(3, report=False), True)):
        with pytest.raises(UserError, match=r"training stopped at step \d+ \(task itm\): 3 steps in a row"):
            for step, bad in enumerate([True, True, True, False], 1):
                if settle:
                    policy.count_on_device(torch.tensor(bad), "itm")
                else:
                    policy.count(bad, step, "itm")
            policy.settle(4)


def test_a_resumed_policy_continues_the_streak_it_saved():
    saved = NonfiniteSteps(limit=3, report=False)
    for bad in (True, True):
        saved.count_on_device(torch.tensor(bad), "mlm")
    saved.settle(2)
    resumed = NonfiniteSteps(limit=3, report=False)
    resumed.load_state_dict(saved.state_dict())
    resumed.count_on_device(torch.tensor(True), "mlm")
    with pytest.raises(UserError, match="3 steps in a row"):
        resumed.settle(3)


def test_positions_count_real_tokens_and_frames_not_padding_or_masked_frames():
    inputs = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool),
        "face_feat": torch.zeros(2, 3, 5),
        "face_mask": torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool),
        "face_frame_mask": torch.ones(2, 3, dtype=torch.bool),
        "mlm_mask": torch.ones(2, 4, dtype=torch.bool),  # a target, not a sequence
        "ids": ["a", "b"],
    }
    assert positions_of(inputs) == 5 + 4 and batch_size_of(inputs) == 2


def test_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", cpu)
    prec = Precision("bf16", cpu)
    with prec.autocast():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    assert Precision("fp32", cpu).scaler is None


# ------------------------------------------------------------------------------------ distributed
def test_single_process_backend(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "HOROVOD_RANK", "HOROVOD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert detect_launcher() == "single"
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torch"
    assert (
        detect_launcher({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2", "RANK": "0", "WORLD_SIZE": "2"})
        == "horovod"
    )
    backend = init_backend("cpu")
    assert type(backend) is Backend and backend.is_main and backend.world_size == 1
    t = torch.tensor([2.0])
    assert backend.all_reduce(t, "avg") is t and float(t) == 2.0
    assert backend.all_gather_object({"a": 1}) == [{"a": 1}]
    model = TinyNet()
    assert unwrap(backend.wrap_model(model)) is model
    with pytest.raises(ValueError):
        backend.all_reduce(t, "prod")
    backend.shutdown()


# ------------------------------------------------------------------------------------ config
def _fake_db(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "meta.json").write_text("{}")
    return str(path)


@pytest.fixture()
def config_dict(tmp_path):
    return {
        "output_dir": str(tmp_path / "out"),
        "model": {"config": str(REPO / "configs" / "model" / "tiny.json")},
        "datasets": {"d": {"txt_db": [_fake_db(tmp_path / "txt")], "face_db": [_fake_db(tmp_path / "face")]}},
        "tasks": [
            {"name": "mlm", "dataset": "d", "ratio": 1},
            {"name": "face_mrfr", "dataset": "d", "ratio": 1},
        ],
        "steps": 10,
    }


def _load(data, *overrides):
    from uniter3m.train.config import load_pretrain_config

    return load_pretrain_config(data, overrides)


def test_config_valid(config_dict):
    cfg = _load(config_dict, "optim.lr=3e-4", "tasks.1.ratio=0")
    assert cfg.optim.lr == 3e-4 and [t.name for t in cfg.active_tasks()] == ["mlm"]


def test_config_missing_database(config_dict, tmp_path):
    config_dict["datasets"]["d"]["face_db"] = [str(tmp_path / "no_such_db")]
    with pytest.raises(ConfigError, match=r"face_db: database .*no_such_db does not exist"):
        _load(config_dict)


def test_config_unknown_task(config_dict):
    config_dict["tasks"][0]["name"] = "mlmm"
    with pytest.raises(ConfigError, match=r"tasks\.0\.name.*unknown task 'mlmm'"):
        _load(config_dict)


def test_config_ratios_all_zero(config_dict):
    with pytest.raises(ConfigError, match="every ratio is 0"):
        _load(config_dict, "tasks.0.ratio=0", "tasks.1.ratio=0")


def test_config_negative_learning_rate_and_unknown_key_listed_together(config_dict):
    config_dict["optim"] = {"lr": -1e-4, "lr_decay": 0.5}
    with pytest.raises(ConfigError) as err:
        _load(config_dict)
    text = str(err.value)
    assert "optim.lr" in text and "greater than 0" in text
    assert "optim.lr_decay: unknown key" in text


def test_config_task_on_undefined_dataset(config_dict):
    config_dict["tasks"][1]["dataset"] = "other"
    with pytest.raises(ConfigError, match="'other' is not defined"):
        _load(config_dict)


def test_shipped_configs_parse_apart_from_their_databases(monkeypatch, tmp_path):
    """Every configs/pretrain/*.json has only known keys and tasks (databases are built later). Read from
    an empty folder: databases a `make demo` left in the checkout (demo_out/db) must not change the outcome."""
    from uniter3m.train.config import PretrainConfig

    monkeypatch.chdir(tmp_path)
    for path in sorted((REPO / "configs" / "pretrain").glob("*.json")):
        data = json.loads(path.read_text())
        with pytest.raises(ConfigError) as err:
            _load(data)
        problems = [line for line in str(err.value).splitlines()[1:] if "does not exist" not in line]
        assert not problems, f"{path.name}: {problems}"
        assert set(data) <= set(PretrainConfig.model_fields)
