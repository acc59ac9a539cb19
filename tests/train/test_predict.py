"""`uniter3m predict` and `EmotionClassifier`, end to end on real media.

One tiny text + face + speech model (module fixture) is fine-tuned for a few steps on 12 astronaut
videos whose audio tracks are real EmoDB utterances (labels: EmoDB's), its databases built by
`build-media-db` (Haar + geometric faces, ComParE speech) and `build-txt-db`. Then predict runs on
a video, a shared EmoDB wav, a shared RAVDESS flac and a long astronaut video with speech muxed in.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.support import REPO
from tests.support.media import make_video, read_wav
from uniter3m.cli import main
from uniter3m.data.store import DbReader
from uniter3m.errors import UserError

EMOTIONS = ("anger", "sadness", "neutral", "fear")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data, minilm_dir):
    """(run folder, videos folder, picked EmoDB rows, shared data) after a few fine-tuning steps."""
    src = shared_data / "emodb"
    with (src / "emodb.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = [
        next(r for r in rows if r["speaker"] == spk and r["emotion"] == e)
        for spk in ("03", "08", "10")
        for e in EMOTIONS
    ]
    root = tmp_path_factory.mktemp("predict")
    videos = root / "videos"
    videos.mkdir()
    for r in picked:
        make_video(videos / f"{r['id']}.mp4", frames=12, fps=6, blank=(), audio=read_wav(src / r["wav"]))
    with (root / "text.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "emotion", "speaker"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("id", "text", "emotion", "speaker")} for r in picked)
    db = root / "db"
    assert main(["build-txt-db", "--input", str(root / "text.csv"), "--id-col", "id", "--text-col", "text",
                 "--label-col", "emotion,speaker", "--tokenizer", str(minilm_dir), "--out", str(db / "txt")]) == 0  # fmt: skip
    assert main(["build-media-db", "--input", str(videos), "--format", "wav", "--pool-frames", "10",
                 "--out", str(db / "speech")]) == 0  # fmt: skip
    assert main(["build-media-db", "--input", str(videos), "--format", "video", "--fps", "6",
                 "--out", str(db / "face")]) == 0  # fmt: skip
    face_dim = DbReader(db / "face", kind="feat").meta["dim"]
    cfg = {
        "output_dir": str(root / "run"),
        "data": {
            "txt_db": str(db / "txt"),
            "face_db": str(db / "face"),
            "speech_db": str(db / "speech"),
            "modalities": "LVA",
            "max_txt_len": 24,
            "max_frames": 20,
        },  # fmt: skip
        "protocol": {"name": "emodb", "scheme": "loso", "speaker_column": "speaker", "valid_speakers": 1},
        "model": {
            "config": str(REPO / "configs/model/tiny.json"),
            "overrides": {"face": {"feat_dim": face_dim, "soft_label_dim": 0}, "speech": {"feat_dim": 130}},
            "classifier": "linear",
        },
        "steps": 4,
        "epochs": 2,
        "batching": {"max_batch_size": 4},
        "optim": {"lr": 0.001},
        "seed": 1,
        "device": "cpu",
        "precision": "fp32",
        "progress": False,
    }
    (root / "config.json").write_text(json.dumps(cfg))
    assert main(["finetune", "--config", str(root / "config.json"), "--fold", "0"]) == 0
    return root / "run", videos, picked, shared_data


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_finetune_records_how_its_inputs_were_made(trained):
    run = trained[0]
    spec = json.loads(next(run.glob("fold00*/best/finetune.json")).read_text())
    inputs = spec["inputs"]
    assert inputs["modalities"] == "LVA" and inputs["max_frames"] == 20 and inputs["normalize"] is True
    speech, face = inputs["streams"]["speech"], inputs["streams"]["face"]
    assert speech["media"]["extractor"] == "compare" and speech["media"]["options"]["pool_frames"] == 10
    assert speech["frame_rate"] == 10 and speech["extractor"]["package"] == "opensmile"
    assert face["media"]["detector"] == "haar" and face["media"]["options"]["fps"] == 6
    assert len(speech["normalisation"]["mean"]) == 130 and speech["normalisation"]["speaker"] == "none"
    assert inputs["text"]["tokenizer"]["vocab_hash"]


def test_finetune_and_evaluate_predictions_carry_probabilities(trained, tmp_path):
    run = trained[0]
    metrics = json.loads(next(run.glob("fold00*/metrics.json")).read_text())
    for row in metrics["predictions"]:
        assert list(row["probs"]) == metrics["classes"]
        assert sum(row["probs"].values()) == pytest.approx(1, abs=1e-3)
        assert row["pred"] == max(row["probs"], key=row["probs"].get)
    assert (
        main(["evaluate", "--checkpoint", str(run), "--modality-sets", "A,LVA", "--out", str(tmp_path)]) == 0
    )
    table = json.loads((tmp_path / "modalities.json").read_text())
    assert set(table["predictions"]) == {"A", "LVA"}
    assert all("probs" in row for row in table["predictions"]["A"])


def test_api_prepared_inputs_and_files_reproduce_the_training_probabilities(trained, tmp_path):
    """The same utterances, prepared from the training dbs or remade from the recordings, get the
    probabilities `finetune` wrote for them: same extractors, tokenizer, truncation and statistics."""
    from uniter3m import EmotionClassifier

    run, videos, picked, _ = trained
    metrics = json.loads(next(run.glob("fold00*/metrics.json")).read_text())
    expected = {row["id"]: row["probs"] for row in metrics["predictions"]}
    clf = EmotionClassifier.from_pretrained(run, device="cpu")
    assert clf.classes == metrics["classes"] and clf.modalities == "LVA"
    db = Path(
        json.loads(next(run.glob("fold00*/best/finetune.json")).read_text())["inputs"]["text"]["db"]
    ).parent
    txt, face, speech = (DbReader(db / n) for n in ("txt", "face", "speech"))
    ids = sorted(expected)
    prepared = [
        {"id": u, "text": txt[u]["text"], "face": face[u]["feat"], "speech": speech[u]["feat"]} for u in ids
    ]
    got = clf.predict(prepared)
    for p in got:
        assert p.modalities == "LVA" and p.label == max(p.probabilities, key=p.probabilities.get)
        assert p.probabilities == pytest.approx(expected[p.id], abs=1e-4)
    manifest = tmp_path / "m.csv"
    text = {r["id"]: r["text"] for r in picked}
    manifest.write_text("id,path,text\n" + "".join(f"{u},{videos / (u + '.mp4')},{text[u]}\n" for u in ids))
    for p in clf.predict([manifest]):
        assert p.probabilities == pytest.approx(expected[p.id], abs=2e-3), p.id
        assert p.start == 0.0 and p.end == pytest.approx(2.0, abs=0.1)
    without = clf.predict([{"id": "x", "text": "", "speech": speech[ids[0]]["feat"], "face": None}])[0]
    assert without.modalities == "A" and sum(without.probabilities.values()) == pytest.approx(1, abs=1e-4)
    with pytest.raises(UserError, match=r"\(T, 130\)"):
        clf.predict([{"id": "x", "speech": np.zeros((3, 7))}])


def test_cli_predict_on_video_wav_flac_and_a_long_video_with_speech(trained, tmp_path):
    run, videos, picked, shared = trained
    two_s = [np.resize(read_wav(shared / "emodb" / r["wav"])[0], 32000) for r in picked[:3]]
    long_video = make_video(
        tmp_path / "talk.mp4",
        frames=36,
        fps=6,
        blank=tuple(range(12, 24)),
        audio=(np.concatenate(two_s), 16000),
    )  # 6 s, speech all along, no face from 2 s to 4 s
    wav = shared / "emodb" / picked[0]["wav"]
    flac = next((shared / "ravdess" / "audio").glob("*.flac"))
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(run), str(videos / f"{picked[1]['id']}.mp4"), str(wav), str(flac),
            str(long_video), "--window", "2", "--hop", "1", "--asr", "whisper-ct2", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = read_csv(out / "predictions.csv")
    classes = json.loads((out / "predictions.json").read_text())["classes"]
    assert [c for c in rows[0] if c.startswith("p_")] == [f"p_{c}" for c in classes]
    by_file = {}
    for row in rows:
        by_file.setdefault(Path(row["recording"]).name, []).append(row)
        assert sum(float(row[f"p_{c}"]) for c in classes) == pytest.approx(1, abs=1e-3)
        assert row["label"] in classes
    assert by_file[wav.name][0]["modalities"] in ("LA", "A")  # no face in a wav: the face stream is left out
    assert "V" not in by_file[flac.name][0]["modalities"]
    assert by_file[f"{picked[1]['id']}.mp4"][0]["modalities"] in ("LVA", "VA")
    talk = by_file["talk.mp4"]  # 6 s in 2 s windows every 1 s
    spans = [(float(r["start"]), float(r["end"])) for r in talk]
    assert spans[:5] == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6)] and spans[-1][1] == pytest.approx(6, abs=0.1)
    assert (
        "V" not in talk[2]["modalities"] and "V" in talk[0]["modalities"]
    )  # frames 12-23 (2-4 s) hold no face
    assert any(r["text"] for r in talk)  # ASR gave the model text
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["segmentation"]["window_s"] == 2 and len(saved["predictions"]) == len(rows)
    for name in by_file:
        assert (out / f"timeline_{Path(name).stem}.png").stat().st_size > 1000


def test_checkpoint_errors_name_the_fix(trained, tmp_path, capsys):
    assert main(["predict", "--checkpoint", str(tmp_path / "nope"), "x.wav", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(tmp_path), "x.wav", "--out", str(tmp_path / "o")]) == 2
    assert "holds no fine-tuned model" in capsys.readouterr().err
    assert (
        main(["predict", "--checkpoint", str(trained[0]), str(tmp_path / "x.wav"), "--out", str(tmp_path)])
        == 2
    )
    assert "x.wav does not exist" in capsys.readouterr().err
