"""Faults in checkpoints, on real safetensors and torch files: flipped bytes, a damaged header,
NaN weights, a cut file, a damaged trainer state. `--resume auto` falls back to the newest
intact checkpoint and says which one it passed over and why; a named checkpoint is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from uniter3m.errors import UserError
from uniter3m.fileio import MANIFEST_NAME
from uniter3m.train import checkpoint as ckpt


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.out = nn.Linear(32, 4)


def save_run(out: Path, steps: tuple[int, ...] = (1, 2, 3)) -> nn.Module:
    """Checkpoints like the loop's: optimiser state and a per-rank parameter digest."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in steps:
        opt.zero_grad()
        model.out(model.inp(torch.randn(8, 16))).pow(2).mean().backward()
        opt.step()
        ranks = [{"param_digest": ckpt.parameter_digest(model)}]
        ckpt.save_checkpoint(out, step, model, {"optimizer": opt.state_dict(), "ranks": ranks}, keep_last=0)
    return model


def step_dir(out: Path, step: int) -> Path:
    return out / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(step)


def flip(file: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= mask
    file.write_bytes(bytes(raw))


def weights_offset(file: Path) -> int:
    """First byte of the tensor data in a safetensors file (after its 8-byte length + JSON header)."""
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


def drop_hashes(folder: Path) -> None:
    """Turn a checkpoint into one written before hashes were recorded (sizes only, no model manifest)."""
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != f"{ckpt.MODEL_DIR}/{MANIFEST_NAME}"]
    for f in manifest["files"]:
        f.pop("sha256")
    (folder / ckpt.MODEL_DIR / MANIFEST_NAME).unlink()
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def resume(out: Path) -> tuple[Path | None, list[str]]:
    lines: list[str] = []
    return ckpt.find_resume(out, "auto", report=lines.append), lines


def test_flipped_bit_in_weights_falls_back_and_names_the_damaged_one(tmp_path):
    save_run(tmp_path)
    weights = step_dir(tmp_path, 3) / "model" / "model.safetensors"
    flip(weights, weights_offset(weights) + 5)
    found, lines = resume(tmp_path)
    assert found == step_dir(tmp_path, 2)
    assert lines[0].startswith(f"checkpoint {step_dir(tmp_path, 3)} is damaged, skipping it:")
    assert "model/model.safetensors differs from what was written (SHA-256 mismatch" in lines[0]
    assert lines[1] == f"resuming from {step_dir(tmp_path, 2)}, the newest intact checkpoint"
    with pytest.raises(UserError, match="not a complete checkpoint, or a damaged one.*SHA-256 mismatch"):
        ckpt.find_resume(tmp_path, str(step_dir(tmp_path, 3)))


def test_damaged_trainer_state_falls_back(tmp_path):
    save_run(tmp_path)
    state = step_dir(tmp_path, 3) / ckpt.TRAINER_STATE
    flip(state, state.stat().st_size // 2, 0x40)
    found, lines = resume(tmp_path)
    assert found == step_dir(tmp_path, 2) and "trainer_state.pt differs from what was written" in lines[0]


def test_truncated_file_is_named_when_falling_back(tmp_path):
    save_run(tmp_path)
    state = step_dir(tmp_path, 3) / ckpt.TRAINER_STATE
    size = state.stat().st_size
    os.truncate(state, size - 100)
    found, lines = resume(tmp_path)
    assert found == step_dir(tmp_path, 2)
    assert f"trainer_state.pt is {size - 100} bytes where {size} were written (truncated or cut)" in lines[0]


def test_checkpoints_without_hashes_are_checked_for_readable_finite_content(tmp_path):
    save_run(tmp_path, steps=(1, 2, 3, 4))
    for step in (1, 2, 3, 4):
        drop_hashes(step_dir(tmp_path, step))
    # 4: a damaged safetensors header; 3: a NaN weight; 2: a trainer state that does not load
    w4 = step_dir(tmp_path, 4) / "model" / "model.safetensors"
    raw = bytearray(w4.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    w4.write_bytes(bytes(raw))
    w3 = step_dir(tmp_path, 3) / "model" / "model.safetensors"
    raw = bytearray(w3.read_bytes())
    at = weights_offset(w3)
    raw[at : at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    w3.write_bytes(bytes(raw))
    s2 = step_dir(tmp_path, 2) / ckpt.TRAINER_STATE
    s2.write_bytes(b"\x00" * s2.stat().st_size)
    found, lines = resume(tmp_path)
    assert found == step_dir(tmp_path, 1)
    assert "model/model.safetensors cannot be read (SafetensorError" in lines[0]
    assert "holds NaN or Inf" in lines[1]
    assert "trainer_state.pt cannot be loaded" in lines[2]
    # loading the damaged weights directly is a clear error too, not a SafetensorError traceback
    with pytest.raises(UserError, match=r"model\.safetensors cannot be read .*older checkpoint"):
        ckpt.load_model_weights(Net(), step_dir(tmp_path, 4) / "model")
    with pytest.raises(UserError, match="cannot read .*trainer_state.pt"):
        ckpt.load_trainer_state(step_dir(tmp_path, 2))


def test_a_finite_change_to_old_weights_is_caught_by_the_parameter_digest(tmp_path):
    save_run(tmp_path)
    folder = step_dir(tmp_path, 3)
    drop_hashes(folder)  # nothing at file level can tell: the checks of the loaded model must
    weights = folder / "model" / "model.safetensors"
    flip(weights, weights_offset(weights) + 1, 0x01)  # a low mantissa bit: still finite
    assert ckpt.verify_checkpoint(folder) == []
    model = Net()
    ckpt.load_model_weights(model, folder / "model")
    state = ckpt.load_trainer_state(folder)
    with pytest.raises(UserError, match="loaded weights differ from those its trainer state recorded"):
        ckpt.check_parameter_digest(model, state, folder)
    intact = step_dir(tmp_path, 2)
    ckpt.load_model_weights(model, intact / "model")
    ckpt.check_parameter_digest(model, ckpt.load_trainer_state(intact), intact)  # passes


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    save_run(tmp_path, steps=(1, 2))
    for step in (1, 2):
        os.truncate(step_dir(tmp_path, step) / ckpt.TRAINER_STATE, 10)
    lines: list[str] = []
    with pytest.raises(UserError, match="every checkpoint under .* is damaged"):
        ckpt.find_resume(tmp_path, "auto", report=lines.append)
    assert len(lines) == 2


def test_intact_run_resumes_silently_from_the_newest(tmp_path, capsys):
    save_run(tmp_path)
    assert ckpt.find_resume(tmp_path, "auto") == step_dir(tmp_path, 3)
    assert capsys.readouterr().err == ""
    assert all(
        "sha256" in f for f in json.loads((step_dir(tmp_path, 3) / ckpt.MANIFEST).read_text())["files"]
    )


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_run(tmp_path, steps=(1,))
    finally:
        os.umask(old)
    folder = step_dir(tmp_path, 1)
    for file in (ckpt.MANIFEST, ckpt.TRAINER_STATE, "model/model.safetensors"):
        assert (folder / file).stat().st_mode & 0o777 == 0o640, file
    assert (tmp_path / ckpt.CHECKPOINT_DIR / ckpt.LATEST).stat().st_mode & 0o777 == 0o640
