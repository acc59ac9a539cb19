"""`--extractor hf:DIR`: real transformers loading and batching, with small random models saved to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.media import make_video
from uniter3m.cli import main
from uniter3m.data.store import DbReader
from uniter3m.errors import UserError
from uniter3m.ingest.encoders import AudioEncoder, VisionEncoder, pool_frames

pytest.importorskip("av", reason="PyAV is not installed: pip install 'uniter3m[media]'")
pytest.importorskip("cv2", reason="OpenCV is not installed: pip install 'uniter3m[media]'")
torch = pytest.importorskip("torch")
FILES = ("03a01Fa", "03a01Nc", "08a02Ab")


def tiny_wav2vec2(path: Path, norm: str) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm=norm,
        do_stable_layer_norm=norm == "layer",
    )
    Wav2Vec2Model(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def w2v(tmp_path_factory) -> Path:
    return tiny_wav2vec2(tmp_path_factory.mktemp("w2v") / "layer", "layer")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    path = tmp_path_factory.mktemp("clip") / "vision"
    CLIPVisionModel(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("bert") / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def speech(shared_data) -> list[np.ndarray]:
    """EmoDB speech at 16 kHz, cut to different lengths (so batches need padding)."""
    from uniter3m.ingest import media

    out = []
    for k, name in enumerate(FILES):
        path = shared_data / "emodb" / "wav" / f"{name}.wav"
        if not path.is_file():
            pytest.skip(f"EmoDB file {path} not found")
        audio = media.segment_audio(media.FileTask(path, [media.Segment(name, path)]), 16000)[0][1]
        out.append(audio[: 16000 * (k + 1) // 2 + 123 * k])
    return out


def test_wav2vec2_build_frame_rate_layers_and_pooling(w2v, shared_data, tmp_path):
    wav = shared_data / "emodb" / "wav" / f"{FILES[0]}.wav"
    if not wav.is_file():
        pytest.skip(f"EmoDB file {wav} not found")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,start,end\nfull,{wav},,\nhalf,{wav},0.5,1.5\nblip,{wav},0,0.01\n")
    base = ["build-media-db", "--manifest", str(manifest), "--format", "wav", "--extractor", f"hf:{w2v}"]
    assert main([*base, "--batch-size", "2", "--out", str(tmp_path / "last")]) == 0
    db = DbReader(tmp_path / "last", "feat")
    assert db.meta["dim"] == 32 and db.meta["dtype"] == "float16"
    ext = db.meta["source"]["extractor"]
    assert ext["frame_rate"] == 50.0 and ext["layers"] == [3] and ext["sample_rate"] == 16000
    assert (
        db.length_of("full") == 99 and db.length_of("half") == 49
    )  # 20 ms frames, conv receptive field 25 ms
    assert db.length_of("blip") == 0 and db.meta["empty_ids"] == ["blip"]  # 10 ms: shorter than one frame
    assert main([*base, "--layer", "1-2", "--pool-frames", "3", "--out", str(tmp_path / "pooled")]) == 0
    pooled = DbReader(tmp_path / "pooled", "feat")
    assert pooled.length_of("full") == 33 and pooled.meta["source"]["extractor"][
        "frame_rate"
    ] == pytest.approx(50 / 3)
    # the stored features are the mean of hidden states 1 and 2, pooled by 3 -- recomputed by hand
    from uniter3m.ingest import media

    audio = media.segment_audio(media.FileTask(wav, [media.Segment("full", wav)]), 16000)[0][1]
    x = torch.from_numpy((audio - audio.mean()) / np.sqrt(audio.var() + 1e-7))[None]
    from transformers import AutoModel

    with torch.inference_mode():
        states = AutoModel.from_pretrained(w2v).eval()(x, output_hidden_states=True).hidden_states
    expected = pool_frames(((states[1] + states[2]) / 2)[0].numpy(), 3)
    np.testing.assert_allclose(pooled["full"]["feat"].astype(np.float32), expected, rtol=2e-2, atol=2e-3)
    last = db["full"]["feat"].astype(np.float32)
    np.testing.assert_allclose(last, states[3][0].numpy(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_batch_size_does_not_change_audio_features(norm, speech, tmp_path):
    path = tiny_wav2vec2(tmp_path / norm, norm)
    # group norm sees the whole input, so only the two equal-length signals share a batch there
    signals = [*speech, np.ascontiguousarray(speech[1][::-1])]
    one = AudioEncoder(path, batch_size=1, device="cpu").encode(signals)
    many = AudioEncoder(path, batch_size=3, device="cpu").encode(signals)
    assert [len(f) for f in one] == [24, 50, 75, 50]  # 0.5 s, 1 s, 1.5 s at 50 frames/s
    for a, b in zip(one, many):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_clip_faces_from_video(clip_dir, tmp_path):
    video = make_video(tmp_path / "astro.mp4")
    argv = ["build-media-db", "--input", str(video), "--format", "video", "--fps", "6"]
    argv += ["--extractor", f"hf:{clip_dir}", "--face-colour", "rgb", "--batch-size", "3"]
    assert main([*argv, "--out", str(tmp_path / "db")]) == 0
    db = DbReader(tmp_path / "db", "feat")
    feat = db["astro"]["feat"].astype(np.float32)
    assert feat.shape == (10, 32) and db.meta["frames_dropped"] == {"no face": 2}
    assert np.isfinite(feat).all() and feat.std(axis=0).mean() > 0  # different crops, different vectors
    ext = db.meta["source"]["extractor"]
    assert ext["model_type"] == "clip_vision_model" and ext["pool"] == "cls" and ext["frame_rate"] == 6.0


def test_batch_size_and_pool_on_vision_features(clip_dir):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (7, 48, 48, 1), dtype=np.uint8)
    one = VisionEncoder(clip_dir, batch_size=1, device="cpu").encode(images)
    many = VisionEncoder(clip_dir, batch_size=4, device="cpu").encode(images)
    np.testing.assert_allclose(one, many, rtol=1e-4, atol=1e-5)
    mean = VisionEncoder(clip_dir, pool="mean", device="cpu").encode(images)
    assert mean.shape == (7, 32) and not np.allclose(mean, one)
    with pytest.raises(UserError, match="hidden states 0..2"):
        VisionEncoder(clip_dir, layers="5")


def test_full_clip_model_keeps_its_image_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 8})
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    enc = VisionEncoder(tmp_path / "clip", device="cpu")
    assert enc.encode(np.zeros((2, 40, 40, 3), np.uint8)).shape == (2, 32)


def test_bad_encoder_directories(bert_dir, w2v, clip_dir, tmp_path):
    with pytest.raises(UserError, match="no transformers model folder"):
        AudioEncoder(tmp_path / "missing")
    with pytest.raises(UserError, match="'bert' model, not an audio encoder"):
        AudioEncoder(bert_dir)
    with pytest.raises(UserError, match="not an audio encoder"):
        AudioEncoder(clip_dir)
    with pytest.raises(UserError, match="'bert' model, not a vision encoder"):
        VisionEncoder(bert_dir)
    with pytest.raises(UserError, match="not a vision encoder"):
        VisionEncoder(w2v)
    with pytest.raises(UserError, match=r"--layer 9: .* hidden states 0..3"):
        AudioEncoder(w2v, layers="9")
    with pytest.raises(UserError, match="--pool-frames"):
        AudioEncoder(w2v, pool_frames=0)
