"""The one checkpoint reader and `load_into` (`uniter3m.model.io`) behind from_pretrained, model.init and convert."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from uniter3m.cli import main as cli_main
from uniter3m.errors import ConfigError, UserError
from uniter3m.fileio import MANIFEST_NAME
from uniter3m.model.config import UniterConfig
from uniter3m.model.conversion import frame_stream
from uniter3m.model.io import load_into, read_checkpoint, read_config
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.model.uniter import UniterModel

FACE_D, SPEECH_D = 12, 10
ALL_HEADS = [
    "mlm",
    "face_regress",
    "speech_regress",
    "face_classifier",
    "face_fom",
    "speech_fom",
    "itm",
    "emo_classifier",
]


def tiny_config(**overrides) -> UniterConfig:
    base = {
        "vocab_size": 60,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": 24,
        "face": {"feat_dim": FACE_D, "max_frames": 6, "soft_label_dim": 5},
        "speech": {"feat_dim": SPEECH_D, "max_frames": 7, "position": "sinusoidal"},
        "speech_type": "own",
    }
    return UniterConfig.from_dict(base, **overrides)


def batch(seed: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    txt_mask = torch.ones(2, 6, dtype=torch.bool)
    txt_mask[1, 4:] = False
    face_mask = torch.ones(2, 4, dtype=torch.bool)
    face_mask[0, 2:] = False
    return {
        "input_ids": torch.randint(1, 60, (2, 6), generator=g) * txt_mask,
        "attention_mask": txt_mask,
        "face_feat": torch.randn(2, 4, FACE_D, generator=g),
        "face_mask": face_mask,
        "speech_feat": torch.randn(2, 5, SPEECH_D, generator=g),
        "face_frame_mask": torch.tensor([[True, False, False, False], [False, False, True, False]]),
    }


def hf_bert_dir(tmp_path, name: str = "hf", **kwargs):
    from transformers import BertConfig, BertModel

    torch.manual_seed(3)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=24,
    )
    model = BertModel(config).eval()
    model.save_pretrained(tmp_path / name, **kwargs)
    return model, tmp_path / name


# ------------------------------------------------------------------ our checkpoints
def test_pretraining_checkpoint_with_streams_and_heads_loads_back_identically(tmp_path):
    """A UniterForPretraining directory as save_pretrained writes it (face + speech + every head)."""
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config(), ALL_HEADS, emo_classes=4).eval()
    model.save_pretrained(tmp_path / "ckpt")

    loaded = read_checkpoint(tmp_path / "ckpt", backbone=UniterModel)
    assert loaded.flavour == "uniter3m" and loaded.streams == {"face", "speech"}
    assert loaded.heads == ALL_HEADS and loaded.config == model.config
    again, info = UniterForPretraining.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    again.eval()
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["new_streams"] == []
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    assert again.cls.predictions.decoder.weight is again.uniter.embeddings.word_embeddings.weight
    x = batch()
    with torch.no_grad():
        want, got = model(**x), again(**x)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        h, pooled = want.last_hidden_state, want.pooler_output
        assert torch.equal(again.cls.predictions(h), model.cls.predictions(h))
        for head in ("face_regress", "speech_regress", "face_classifier"):
            assert torch.equal(getattr(again, head)(h), getattr(model, head)(h)), head
        table = model.uniter.face_embeddings.position_table(4)
        assert torch.equal(again.face_fom(h, table), model.face_fom(h, table))
        assert torch.equal(again.itm(pooled), model.itm(pooled))
        assert torch.equal(again.emo_classifier(pooled), model.emo_classifier(pooled))

    # the backbone alone reads the same directory; heads are reported as unused
    backbone, info = UniterModel.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    assert info["missing_keys"] == set()
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == {"cls", *ALL_HEADS[1:]}
    with torch.no_grad():
        assert torch.equal(backbone.eval()(**x).pooler_output, want.pooler_output)


def test_missing_encoder_weights_are_an_error_listing_them(tmp_path):
    torch.manual_seed(0)
    UniterModel(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()  # a folder without a manifest (an HF model): the load itself checks
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = sorted(k for k in weights if k.startswith("encoder.layer.1.attention"))
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"found no source key") as err:
        UniterModel.from_pretrained(tmp_path)
    assert "uniter.encoder.layer.1.attention.output.LayerNorm.bias" in str(err.value)
    assert "allow_new" in str(err.value)

    # asked for explicitly, they start fresh and are reported
    model = UniterModel(tiny_config())
    info = load_into(
        model,
        read_checkpoint(tmp_path, backbone=UniterModel),
        allow_new=["uniter.encoder.layer.1.attention.*"],
    )
    assert info["missing_keys"] == set(dropped)


def test_a_stream_the_checkpoint_lacks_starts_fresh_and_is_reported(tmp_path, caplog):
    torch.manual_seed(0)
    UniterModel(tiny_config(speech={"feat_dim": 0})).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="uniter3m.model.io"):
        model, info = UniterModel.from_pretrained(
            tmp_path, output_loading_info=True, speech={"feat_dim": SPEECH_D}
        )
    assert info["new_streams"] == ["speech"]
    assert info["missing_keys"] and all(k.startswith("speech_embeddings.") for k in info["missing_keys"])
    assert "new frame streams speech" in caplog.text
    # a stream the checkpoint has, in another layout (a projection it lacks), is refused
    with pytest.raises(UserError, match=r"face_embeddings\.projs_linear\.weight"):
        UniterModel.from_pretrained(tmp_path, face={"projection": True})


def test_learned_positions_for_a_sinusoidal_stream_are_refused_with_the_fix(tmp_path):
    torch.manual_seed(0)
    UniterModel(tiny_config()).save_pretrained(tmp_path)  # speech positions are sinusoidal
    with pytest.raises(UserError, match=r"speech_embeddings\.position_embeddings\.weight(.*\n)*.*sinusoidal"):
        UniterModel.from_pretrained(tmp_path, speech={"position": "learned"})


def test_frame_streams_are_recognised_by_name_not_by_a_list():
    assert frame_stream("uniter.pose_embeddings.feat_linear.weight") == "pose"
    assert frame_stream("uniter.head_pose_embeddings.mask_embedding") == "head_pose"
    assert frame_stream("uniter.embeddings.word_embeddings.weight") is None
    assert frame_stream("face_regress.bias") is None


def test_override_that_contradicts_the_weights_names_key_shapes_and_fix(tmp_path):
    torch.manual_seed(0)
    UniterModel(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        UniterModel.from_pretrained(tmp_path, face={"feat_dim": FACE_D + 1})
    text = str(err.value)
    assert "face_embeddings.feat_linear.weight" in text and "(32, 12)" in text and "(32, 13)" in text
    assert "face.feat_dim=12" in text


# ------------------------------------------------------------------ HF BERT family
def test_hf_sharded_directory_and_a_missing_mlm_head(tmp_path):
    hf, folder = hf_bert_dir(tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    model, info = UniterForPretraining.from_pretrained(folder, heads=["mlm", "itm"], output_loading_info=True)
    assert {k.split(".")[0] for k in info["missing_keys"]} == {"cls", "itm"}  # heads start fresh
    ids = torch.randint(1, 60, (2, 7))
    with torch.no_grad():
        got = model.eval()(input_ids=ids)
        want = hf(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=0)


def test_roberta_directory_through_from_pretrained_gets_the_position_offset(tmp_path):
    """model.init = an HF RoBERTa folder: the same offset rule as `uniter3m convert`."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(2)
    hf = RobertaModel(
        RobertaConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=22,
            type_vocab_size=1,
            pad_token_id=1,
        )
    ).eval()
    hf.save_pretrained(tmp_path)
    assert read_config(tmp_path).max_position_embeddings == 20
    model, info = UniterModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set()
    ids = torch.tensor([[0, 7, 8, 9, 10, 2], [0, 11, 12, 2, 1, 1]])
    mask = ids != 1
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask], expected[mask], atol=2e-5, rtol=1e-4)


def test_research_state_dicts_need_their_kind(tmp_path):
    torch.save({"uniter.pooler.dense.bias": torch.zeros(4)}, tmp_path / "model_step_5.pt")
    with pytest.raises(UserError, match="--from memobert"):
        UniterModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------ damaged checkpoints
@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_damaged_weights_are_a_user_error_naming_the_file(tmp_path, capsys, damage):
    torch.manual_seed(0)
    UniterModel(tiny_config()).save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / MANIFEST_NAME).unlink()  # without a manifest, reading the file finds the damage
    file = tmp_path / "ours" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
        if damage == "random bytes"
        else data[: len(data) // 2]
    )
    with pytest.raises(UserError, match="model.safetensors"):
        UniterModel.from_pretrained(tmp_path / "ours")
    code = cli_main(
        ["convert", "--to", "hf-bert", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(file) in err and "Traceback" not in err


def test_damaged_config_is_a_user_error_naming_the_file(tmp_path, capsys):
    torch.manual_seed(0)
    UniterModel(tiny_config()).save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / "config.json").write_bytes(b"\x8f\x00\xffnot json")
    code = cli_main(
        ["convert", "--to", "hf-bert", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]
    )
    assert code == 2 and "config.json" in capsys.readouterr().err


def test_config_that_disagrees_with_its_weights_names_key_shapes_and_fix(tmp_path, capsys):
    torch.manual_seed(0)
    UniterModel(tiny_config()).save_pretrained(tmp_path / "ours")
    (tmp_path / "ours" / MANIFEST_NAME).unlink()  # a hand-edited folder without a manifest
    config_file = tmp_path / "ours" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "intermediate_size": 64}))
    code = cli_main(
        ["convert", "--to", "hf-bert", "--checkpoint", str(tmp_path / "ours"), "--out", str(tmp_path / "hf")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        "uniter.encoder.layer.0.intermediate.dense.weight: (48, 32) in the checkpoint, (64, 32) in the model"
        in err
    )
    assert "intermediate_size=48" in err and str(config_file) in err
    assert "size mismatch" not in err
    assert not (tmp_path / "hf" / "model.safetensors").exists()

    # an HF folder whose config.json lost a layer: the weights hold tensors it has no place for
    _, folder = hf_bert_dir(tmp_path)
    hf_config = folder / "config.json"
    hf_config.write_text(json.dumps({**json.loads(hf_config.read_text()), "num_hidden_layers": 1}))
    with pytest.raises(ConfigError, match=r"no place for.*encoder\.layer\.1"):
        UniterModel.from_pretrained(folder)


def test_a_missing_pooler_is_refused_unless_the_checkpoint_is_an_mlm_model(tmp_path):
    """BertForMaskedLM saves no pooler (test_model covers it loading); a BertModel without one is damaged."""
    _, folder = hf_bert_dir(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("pooler.")}, str(folder / "model.safetensors")
    )
    with pytest.raises(UserError, match=r"uniter\.pooler\.dense\.bias"):
        UniterModel.from_pretrained(folder)
    args = ["convert", "--from", "hf-bert", "--checkpoint", str(folder), "--out", str(tmp_path / "ours")]
    assert cli_main([*args, "--allow-new", "uniter.pooler.*"]) == 0
    report = json.loads((tmp_path / "ours" / "conversion_report.json").read_text())
    assert report["new"] == ["uniter.pooler.dense.bias", "uniter.pooler.dense.weight"]


# ------------------------------------------------------------------ strict loads (best/, resume)
def test_finetuned_dir_loads_strictly_and_a_missing_weight_is_refused(tmp_path):
    from uniter3m.model.finetuning import FinetuneModel, HeadSpec, load_finetuned, save_finetuned

    torch.manual_seed(0)
    spec = HeadSpec(classifier="mlp", classes=["a", "b", "c"], modalities="LV")
    model = FinetuneModel(UniterModel(tiny_config()), spec).eval()
    save_finetuned(model, tmp_path / "best")
    again = load_finetuned(tmp_path / "best").eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(again(**x).logits, model(**x).logits)

    file = tmp_path / "best" / "model.safetensors"
    (tmp_path / "best" / MANIFEST_NAME).unlink()  # hand-edited below: the strict load itself must refuse
    weights = load_file(str(file))
    save_file({k: v for k, v in weights.items() if k != "head.net.4.bias"}, str(file))
    with pytest.raises(ConfigError, match=r"does not fit the model: missing \['head\.net\.4\.bias'\]"):
        load_finetuned(tmp_path / "best")
    save_file({**weights, "head.extra": torch.zeros(2)}, str(file))
    with pytest.raises(ConfigError, match=r"unexpected \['head\.extra'\]"):
        load_finetuned(tmp_path / "best")


def test_strict_load_of_any_module_and_the_prompt_head_from_a_checkpoint(tmp_path):
    """Resume loads modules that are not ours (no config.json); the prompt head reads the MLM head."""
    from uniter3m.model.finetuning import FinetuneModel, HeadSpec, load_mlm_head

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    tmp_path.joinpath("net").mkdir()
    save_file(net.state_dict(), str(tmp_path / "net" / "model.safetensors"))
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert load_into(fresh, tmp_path / "net", strict=True)["missing_keys"] == set()
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(ConfigError, match=r"missing \['2\.bias', '2\.weight'\]"):
        load_into(torch.nn.Sequential(*fresh, torch.nn.Linear(4, 2)), tmp_path / "net", strict=True)

    torch.manual_seed(0)
    pretrained = UniterForPretraining(tiny_config(), ["mlm"])
    with torch.no_grad():
        pretrained.cls.predictions.bias.normal_()  # a trained head's bias is not zero
    pretrained.save_pretrained(tmp_path / "mlm")
    spec = HeadSpec(classifier="prompt", classes=["a", "b"], prompt_ids=[5, 6], verbalizer_ids=[7, 8])
    model = FinetuneModel(UniterModel.from_pretrained(tmp_path / "mlm"), spec)
    assert not torch.equal(model.cls["predictions"].bias, pretrained.cls.predictions.bias)
    load_mlm_head(model, tmp_path / "mlm")
    for key, tensor in pretrained.cls.predictions.state_dict().items():
        assert torch.equal(model.cls["predictions"].state_dict()[key], tensor), key
    assert model.cls["predictions"].decoder.weight is model.uniter.embeddings.word_embeddings.weight
