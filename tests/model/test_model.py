"""UniterModel: parity with HF BERT, checkpoints, every modality subset, frame masks, checkpointing."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.support import REPO
from uniter3m import UniterConfig, UniterModel
from uniter3m.errors import ConfigError, UserError
from uniter3m.model.pretraining import UniterForPretraining

FACE_D, SPEECH_D = 12, 20


def tiny_config(**overrides) -> UniterConfig:
    base = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 40,
        "face": {"feat_dim": FACE_D, "max_frames": 8, "soft_label_dim": 5},
        "speech": {"feat_dim": SPEECH_D, "max_frames": 8, "position": "sinusoidal"},
        "speech_type": "own",
    }
    return UniterConfig.from_dict(base, **overrides)


def tiny_model(**overrides) -> UniterModel:
    torch.manual_seed(0)
    return UniterModel(tiny_config(**overrides)).eval()


def batch(b: int = 3, lt: int = 6, tv: int = 5, ta: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch with padding in every stream and one utterance without face and speech frames."""
    g = torch.Generator().manual_seed(seed)
    txt_mask = torch.ones(b, lt, dtype=torch.bool)
    txt_mask[1, 4:] = False
    face_mask = torch.ones(b, tv, dtype=torch.bool)
    face_mask[0, 3:] = False
    face_mask[2] = False  # no face found
    speech_mask = torch.ones(b, ta, dtype=torch.bool)
    speech_mask[1, 2:] = False
    speech_mask[2] = False  # no speech either
    return {
        "input_ids": torch.randint(1, 100, (b, lt), generator=g) * txt_mask,
        "attention_mask": txt_mask,
        "face_feat": torch.randn(b, tv, FACE_D, generator=g),
        "face_mask": face_mask,
        "speech_feat": torch.randn(b, ta, SPEECH_D, generator=g),
        "speech_mask": speech_mask,
    }


def meld_sentences(shared_data, n: int = 8) -> list[str]:
    with open(shared_data / "meld" / "train_sent_emo.csv", encoding="utf-8", newline="") as f:
        rows = [row["Utterance"] for row in csv.DictReader(f)]
    return rows[:n]


# -- HF BERT parity and loading ---------------------------------------------------------------


def test_text_only_matches_hf_bert(minilm_dir, tokenizer, shared_data):
    from transformers import BertModel

    sentences = meld_sentences(shared_data)
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 3  # really different lengths

    model, info = UniterModel.from_pretrained(
        minilm_dir, output_loading_info=True, face={"feat_dim": 342}, speech={"feat_dim": 768}
    )
    hf = BertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        ours = model.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"].bool())
        ref = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(ours.last_hidden_state[real], ref.last_hidden_state[real], atol=1e-5, rtol=0)
    # padded positions carry no meaning (HF's own eager and SDPA paths differ there by ~3e-5)
    torch.testing.assert_close(ours.last_hidden_state, ref.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    assert ours.segments == {"text": slice(0, enc["input_ids"].shape[1])}

    # the text side came from the checkpoint unchanged; only the frame streams are new
    assert info["missing_keys"] and all(
        k.startswith(("face_embeddings.", "speech_embeddings.")) for k in info["missing_keys"]
    )
    assert "face_embeddings.feat_linear.weight" in info["missing_keys"]
    assert info["unexpected_keys"] == set()


def test_hf_masked_lm_directory_loads_backbone_and_mlm_head(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    hf_cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
    )
    hf = BertForMaskedLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "safe")
    # an old-style folder: pytorch_model.bin with TF-era LayerNorm names gamma/beta
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in hf.state_dict().items()
    }
    torch.save(legacy, tmp_path / "bin" / "pytorch_model.bin")
    ids = torch.randint(1, 100, (2, 9))
    with torch.no_grad():
        ref_logits = hf(input_ids=ids).logits
        ref_hidden = hf.bert(input_ids=ids).last_hidden_state
    for folder in ("safe", "bin"):
        backbone, info = UniterModel.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}  # MaskedLM has no pooler
        assert all(k.startswith("cls.") for k in info["unexpected_keys"])
        with torch.no_grad():
            torch.testing.assert_close(
                backbone.eval()(input_ids=ids).last_hidden_state, ref_hidden, atol=1e-5, rtol=0
            )

        model, info = UniterForPretraining.from_pretrained(
            tmp_path / folder,
            heads=["mlm", "face_regress"],
            face={"feat_dim": FACE_D},
            output_loading_info=True,
        )
        assert {k for k in info["missing_keys"] if not k.startswith(("uniter.face_", "face_regress"))} == {
            "uniter.pooler.dense.weight",
            "uniter.pooler.dense.bias",
        }
        assert "face_regress.bias" in info["missing_keys"]
        with torch.no_grad():
            logits = model.cls.predictions(model.eval()(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model(face={"projection": True})
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["model_type"] == "bert" and saved["uniter3m_format"] == 2  # HF-readable, and ours
    loaded, info = UniterModel.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(**x).last_hidden_state, loaded.eval()(**x).last_hidden_state)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_pretraining_round_trip_keeps_ties(tmp_path):
    torch.manual_seed(0)
    heads = [
        "mlm",
        "face_regress",
        "speech_regress",
        "face_classifier",
        "face_fom",
        "speech_fom",
        "itm",
        "emo_classifier",
    ]
    model = UniterForPretraining(tiny_config(), heads, emo_classes=7)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.face_regress.weight is model.uniter.face_embeddings.feat_linear.weight
    model.save_pretrained(tmp_path)
    loaded, info = UniterForPretraining.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert loaded.heads == heads and loaded.emo_classes == 7
    assert loaded.cls.predictions.decoder.weight is loaded.uniter.embeddings.word_embeddings.weight
    assert loaded.speech_regress.weight is loaded.uniter.speech_embeddings.feat_linear.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    # the backbone alone loads out of a directory with heads
    backbone, info = UniterModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {h if h != "mlm" else "cls" for h in heads}
    assert torch.equal(backbone.pooler.dense.weight, model.uniter.pooler.dense.weight)


def test_shape_mismatch_is_an_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="face_embeddings.feat_linear.weight"):
        UniterModel.from_pretrained(tmp_path, face={"feat_dim": FACE_D + 1})


# -- modality subsets, masks, positions --------------------------------------------------------

SUBSETS = [
    ("text",),
    ("face",),
    ("speech",),
    ("text", "face"),
    ("text", "speech"),
    ("face", "speech"),
    ("text", "face", "speech"),
]


@pytest.mark.parametrize("streams", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_modality_subset(streams):
    model = tiny_model()
    x = batch()
    keys = {
        "text": ("input_ids", "attention_mask"),
        "face": ("face_feat", "face_mask"),
        "speech": ("speech_feat", "speech_mask"),
    }
    inputs = {k: x[k] for s in streams for k in keys[s]}
    with torch.no_grad():
        out = model(**inputs)
    lengths = {"text": 6, "face": 5, "speech": 7}
    total = sum(lengths[s] for s in streams)
    assert out.last_hidden_state.shape == (3, total, 32)
    assert out.pooler_output.shape == (3, 32)
    assert out.attention_mask.shape == (3, total)
    assert list(out.segments) == list(streams)
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    for name in streams:
        assert out.segments[name].stop - out.segments[name].start == lengths[name]


def test_a_stream_with_zero_frames_in_the_whole_batch():
    model = tiny_model()
    x = batch()
    with torch.no_grad():
        out = model(
            input_ids=x["input_ids"],
            face_feat=torch.zeros(3, 0, FACE_D),
            face_mask=torch.zeros(3, 0, dtype=torch.bool),
        )
        ref = model(input_ids=x["input_ids"])
    assert out.segments["face"] == slice(6, 6)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state)


def test_padding_does_not_change_real_positions():
    """Extra padded frames with garbage features leave every real position's output unchanged."""
    model = tiny_model()
    x = batch()
    padded = dict(x)
    padded["face_feat"] = torch.cat([x["face_feat"], 100 * torch.randn(3, 2, FACE_D)], dim=1)
    padded["face_mask"] = torch.cat([x["face_mask"], torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a, b = model(**x), model(**padded)
    keep = a.attention_mask
    b_face = b.last_hidden_state[:, b.segments["face"]][:, :5]
    torch.testing.assert_close(
        a.last_hidden_state[:, a.segments["face"]][keep[:, a.segments["face"]]],
        b_face[keep[:, a.segments["face"]]],
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        a.last_hidden_state[:, :6][keep[:, :6]], b.last_hidden_state[:, :6][keep[:, :6]], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=0)


def test_utterance_with_no_position_at_all_stays_finite():
    model = tiny_model()
    x = batch()
    face_mask = x["face_mask"].clone()
    face_mask[1] = False
    with torch.no_grad():
        out = model(face_feat=x["face_feat"], face_mask=face_mask)  # rows 1 and 2 have nothing
    assert torch.isfinite(out.last_hidden_state).all() and torch.isfinite(out.pooler_output).all()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(face_feat=x["face_feat"], face_mask=face_mask, input_ids=x["input_ids"])
    assert torch.isfinite(out.last_hidden_state).all()


def test_frame_mask_replaces_masked_frames_by_the_mask_vector():
    model = tiny_model()
    x = batch()
    frame_mask = torch.zeros(3, 5, dtype=torch.bool)
    frame_mask[0, 1] = frame_mask[1, 3] = True
    with torch.no_grad():
        masked = model(**x, face_frame_mask=frame_mask).last_hidden_state
        # the masked frames' features no longer matter ...
        other = dict(x, face_feat=x["face_feat"] + 5 * frame_mask.unsqueeze(-1))
        assert torch.equal(masked, model(**other, face_frame_mask=frame_mask).last_hidden_state)
        # ... they are exactly the learned vector in feature space
        manual = dict(
            x,
            face_feat=torch.where(
                frame_mask.unsqueeze(-1), model.face_embeddings.mask_embedding, x["face_feat"]
            ),
        )
        torch.testing.assert_close(masked, model(**manual).last_hidden_state, atol=1e-6, rtol=0)
        # and only through them does the output change
        plain = model(**x).last_hidden_state
        assert not torch.allclose(masked[0], plain[0]) and not torch.allclose(masked[1], plain[1])
        assert torch.equal(masked[2], plain[2])


def test_feature_dropout_zeroes_raw_features_in_training_only():
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    x = batch()
    face = x["face_feat"]
    plain = tiny_model(**no_dropout).face_embeddings.train()
    dropped = tiny_model(**no_dropout, feature_dropout=0.5).face_embeddings.train()
    torch.manual_seed(3)
    out = dropped(face)
    # training: some input dims are zeroed (the rest scaled by 2), so the output is that of such an input
    torch.manual_seed(3)
    keep = torch.nn.functional.dropout(torch.ones_like(face), 0.5)
    assert 0.3 < (keep == 0).float().mean() < 0.7
    torch.testing.assert_close(out, plain(face * keep), atol=1e-5, rtol=0)
    assert not torch.allclose(out, plain(face), atol=1e-3)
    # evaluation, and the default 0.0: the features pass untouched
    torch.testing.assert_close(dropped.eval()(face), plain(face), atol=1e-6, rtol=0)
    assert torch.equal(plain(face), plain(face))


def test_gradient_checkpointing_gives_the_same_gradients():
    x = batch()
    grads = []
    for recompute in (False, True):
        model = tiny_model(gradient_checkpointing=recompute).train()
        torch.manual_seed(3)  # same dropout masks (checkpoint replays the RNG state)
        out = model(**x)
        (out.last_hidden_state.pow(2).mean() + out.pooler_output.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_sinusoidal_positions_beyond_max_frames_and_learned_limit():
    model = tiny_model()
    long = torch.randn(2, 30, SPEECH_D)  # speech max_frames is 8, sinusoidal
    with torch.no_grad():
        out = model(speech_feat=long)
    assert out.last_hidden_state.shape == (2, 30, 32) and torch.isfinite(out.last_hidden_state).all()
    table = model.speech_embeddings.position_table(30)
    torch.testing.assert_close(table[:8], model.speech_embeddings.position_table(8))
    with pytest.raises(UserError, match="max_frames"):
        model(face_feat=torch.randn(2, 9, FACE_D))  # face positions are learned, 8 rows


def test_bad_inputs_are_clear_errors():
    model = tiny_model(speech={"feat_dim": 0})
    with pytest.raises(UserError, match="expects 12"):
        model(face_feat=torch.randn(2, 3, FACE_D + 1))
    with pytest.raises(UserError, match="speech.feat_dim"):
        model(speech_feat=torch.randn(2, 3, SPEECH_D))
    with pytest.raises(UserError, match="at least one stream"):
        model()


def test_bad_config_lists_every_bad_key(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(
        json.dumps(
            {
                "hidden_size": -1,
                "num_hidden_layers": "two",
                "hidden_act": "tanh",
                "face": {"feat_dim": 342, "position": "rotary", "colour": 1},
                "wat": 3,
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        UniterConfig.from_json(path)
    text = str(err.value)
    for key in ("hidden_size", "num_hidden_layers", "hidden_act", "face.position", "face.colour", "wat"):
        assert key in text, key
    assert str(path) in text and "6 bad key(s)" in text
    with pytest.raises(ConfigError, match="does not divide"):
        UniterConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})


def test_shipped_configs_and_hf_config(minilm_dir):
    from uniter3m.model.config import UniterConfig as C

    sizes = {
        name: C.from_json(REPO / "configs" / "model" / f"{name}.json") for name in ("base", "small", "tiny")
    }
    assert (sizes["base"].num_hidden_layers, sizes["base"].hidden_size) == (12, 768)
    assert (sizes["base"].face.feat_dim, sizes["base"].speech.feat_dim) == (342, 768)
    assert sizes["tiny"].vocab_size == 30522 and sizes["tiny"].hidden_size <= 128
    hf = C.from_pretrained(minilm_dir, face={"feat_dim": 342})
    assert (hf.hidden_size, hf.num_hidden_layers, hf.face.feat_dim, hf.speech.feat_dim) == (384, 6, 342, 0)
    with pytest.raises(ConfigError, match="position_embedding_type"):
        C.from_hf_bert({"position_embedding_type": "relative_key"})


def test_heads_shapes():
    torch.manual_seed(0)
    model = UniterForPretraining(
        tiny_config(),
        ["mlm", "face_regress", "face_classifier", "face_fom", "itm", "emo_classifier"],
        emo_classes=4,
    ).eval()
    x = batch()
    with torch.no_grad():
        out = model(**x)
        h = out.last_hidden_state
        face_h = h[:, out.segments["face"]]
        assert model.cls.predictions(h[:, :2]).shape == (3, 2, 100)
        assert model.face_regress(face_h).shape == (3, 5, FACE_D)
        assert model.face_classifier(face_h).shape == (3, 5, 5)
        assert model.face_fom(face_h, model.uniter.face_embeddings.position_table(5)).shape == (3, 5, 5)
        assert model.itm(out.pooler_output).shape == (3, 2)
        assert model.emo_classifier(out.pooler_output).shape == (3, 4)
    with pytest.raises(ConfigError, match="soft_label_dim"):
        UniterForPretraining(tiny_config(face={"soft_label_dim": 0}), ["face_classifier"])
    with pytest.raises(ConfigError, match="unknown head"):
        UniterForPretraining(tiny_config(), ["mrm"])
