"""`build-media-db --format wav`: real openSMILE ComParE_2016 LLD + delta frames from audio files."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from uniter3m.cli import main
from uniter3m.data.store import DbReader

opensmile = pytest.importorskip(
    "opensmile", reason="openSMILE is not installed: pip install 'uniter3m[speech]'"
)
SR = 16000


def write_wav(path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(SR)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype(np.int16).tobytes())


def test_wav_folder_gives_130d_frames_every_10ms(tmp_path):
    audio = tmp_path / "audio"
    (audio / "ses1").mkdir(parents=True)
    t = np.arange(int(1.5 * SR)) / SR
    write_wav(audio / "ses1" / "tone.wav", 0.3 * np.sin(2 * np.pi * 220 * t))
    write_wav(audio / "noise.wav", 0.1 * np.random.default_rng(0).standard_normal(int(0.8 * SR)))
    write_wav(audio / "click.wav", np.zeros(int(0.01 * SR)))  # shorter than one analysis window
    argv = ["build-media-db", "--input", str(audio), "--format", "wav", "--dtype", "float32"]
    assert main([*argv, "--out", str(tmp_path / "db")]) == 0  # float32: ComParE energies overflow float16

    db = DbReader(tmp_path / "db", "feat")
    assert db.meta["dim"] == 130 and sorted(db.ids) == ["click", "noise", "ses1/tone"]
    tone = db["ses1/tone"]["feat"].astype(np.float64)
    assert abs(len(tone) - 150) <= 6  # one frame per 10 ms of a 1.5 s file
    voiced_f0 = tone[:, 0][tone[:, 0] > 0]  # column 0: F0final_sma (Hz)
    assert abs(np.median(voiced_f0) - 220) < 5
    assert abs(db.length_of("noise") - 80) <= 6
    # too short for openSMILE's window: an empty stream, kept and counted, not a NaN error
    assert db.length_of("click") == 0 and db.meta["empty"] == 1


def test_unreadable_audio_names_the_file(tmp_path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "broken.wav").write_bytes(b"RIFF....not audio")
    assert (
        main(["build-media-db", "--input", str(audio), "--format", "wav", "--out", str(tmp_path / "db")]) == 2
    )
    err = capsys.readouterr().err
    assert "broken.wav" in err and "'broken'" in err and "re-export" in err
