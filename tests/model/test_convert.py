"""`uniter3m convert`: HF BERT/RoBERTa, Google TF BERT and MEmoBERT/UNITER checkpoints in, HF BERT out.

The MEmoBERT checkpoint is built here from the key layout of its public code (docs/DESIGN.md §5):
a random UniterForPretraining renamed to MEmoBERT's names by `to_memobert` below, written
independently of the converter's own tables so that a wrong rule there cannot hide itself.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from uniter3m.cli import main as cli_main
from uniter3m.errors import UserError
from uniter3m.model import conversion as conv
from uniter3m.model.config import UniterConfig
from uniter3m.model.export import REPORT_NAME, convert_to_ours, export_to_hf_bert, read_report
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.model.uniter import UniterModel

FACE_D, SPEECH_D, FACE_CLASSES = 12, 10, 8
HAS_TF = importlib.util.find_spec("tensorflow") is not None


# ----------------------------------------------------------------------------- helpers
def tiny_config(**overrides) -> UniterConfig:
    base = {
        "vocab_size": 60,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": 24,
        "face": {"feat_dim": FACE_D, "max_frames": 6, "soft_label_dim": FACE_CLASSES},
        "speech": {"feat_dim": SPEECH_D, "max_frames": 7},
        "speech_type": "own",
    }
    return UniterConfig.from_dict(base, **overrides)


def inputs(seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    txt_mask = torch.ones(2, 7, dtype=torch.bool)
    txt_mask[1, 5:] = False
    face_mask = torch.ones(2, 4, dtype=torch.bool)
    face_mask[0, 3:] = False
    speech_mask = torch.ones(2, 5, dtype=torch.bool)
    speech_mask[1, 2:] = False
    return {
        "input_ids": torch.randint(1, 60, (2, 7), generator=g) * txt_mask,
        "attention_mask": txt_mask,
        "face_feat": torch.randn(2, 4, FACE_D, generator=g),
        "face_mask": face_mask,
        "speech_feat": torch.randn(2, 5, SPEECH_D, generator=g),
        "speech_mask": speech_mask,
        "face_frame_mask": torch.tensor([[False, True, False, False], [True, False, False, False]]),
    }


def _ln(name: str) -> str:
    """LayerNorm weight/bias -> MEmoBERT's TF-era gamma/beta."""
    if (
        ".LayerNorm." in name
        or "layer_norm." in name
        or name.startswith(("feat_regress.net.2", "region_classifier.net.2"))
    ):
        return name.replace(".weight", ".gamma").replace(".bias", ".beta")
    return name


def to_memobert(model: UniterForPretraining) -> dict[str, torch.Tensor]:
    """Our pretraining model -> a state dict in MEmoBERT's key layout (their code, not our tables)."""
    theirs: dict[str, torch.Tensor] = {}
    stream_names = {
        "face_embeddings.": ("img_embeddings.", "img_linear", "img_layer_norm"),
        "speech_embeddings.": ("speech_embeddings.", "speech_linear", "speech_layer_norm"),
    }
    for key, tensor in model.state_dict().items():
        t = tensor.clone()
        if key.startswith("uniter."):
            name = key[len("uniter.") :]
            for ours, (module, linear, norm) in stream_names.items():
                if name.startswith(ours):
                    part = name[len(ours) :]
                    if part == "mask_embedding":  # (D,) -> nn.Embedding(2, D): row 0 unused, row 1 = mask
                        t = torch.stack([torch.randn_like(tensor), tensor])
                        part = "mask_embedding.weight"
                    part = part.replace("feat_linear", linear).replace("feat_layer_norm", norm)
                    name = module + part
            theirs[_ln("uniter." + name)] = t
        elif key.startswith("cls.predictions."):
            theirs[_ln(key)] = t
        elif key.startswith("face_regress."):
            theirs[_ln("feat_regress." + key[len("face_regress.") :])] = t
        elif key.startswith("speech_regress."):
            theirs[_ln("speech_feat_regress." + key[len("speech_regress.") :])] = t
        elif key.startswith("face_classifier."):
            theirs[_ln("region_classifier." + key[len("face_classifier.") :])] = t
        elif key.startswith("itm.linear."):
            theirs["itm_output." + key[len("itm.linear.") :]] = t
        else:
            raise AssertionError(f"test helper has no MEmoBERT name for {key}")
    # Heads of theirs with no uniter3m counterpart, and a stray key.
    theirs["vfom_output.output.0.weight"] = torch.randn(64, 32)
    theirs["emo_classifier.output.3.weight"] = torch.randn(7, 64)
    theirs["uniter.embeddings.word_senti_embedding.weight"] = torch.randn(3, 32)
    theirs["optimizer_leftover.step"] = torch.tensor(5.0)
    return theirs


def memobert_source(tmp_path) -> tuple[UniterForPretraining, dict[str, torch.Tensor], object]:
    torch.manual_seed(0)
    heads = ["mlm", "face_regress", "speech_regress", "face_classifier", "itm"]
    model = UniterForPretraining(tiny_config(), heads).eval()
    theirs = to_memobert(model)
    torch.save(theirs, tmp_path / "model_step_300.pt")
    (tmp_path / "uniter-tiny.json").write_text(json.dumps({"num_attention_heads": 4, "hidden_act": "gelu"}))
    return model, theirs, tmp_path / "model_step_300.pt"


# ----------------------------------------------------------------------------- HF BERT
def test_hf_round_trip_of_minilm_is_bit_identical(minilm_dir, tmp_path):
    from transformers import BertModel

    ours_dir, hf_dir = tmp_path / "ours", tmp_path / "hf"
    assert (
        cli_main(["convert", "--from", "hf-bert", "--checkpoint", str(minilm_dir), "--out", str(ours_dir)])
        == 0
    )
    assert cli_main(["convert", "--to", "hf-bert", "--checkpoint", str(ours_dir), "--out", str(hf_dir)]) == 0

    report = read_report(ours_dir)
    assert report["counts"] == {"converted": 103, "new": 0, "ignored": 1}
    assert list(report["ignored"]) == ["embeddings.position_ids"]  # an index buffer, not a weight
    original, exported = (
        load_file(str(minilm_dir / "model.safetensors")),
        load_file(str(hf_dir / "model.safetensors")),
    )
    weights = {k: v for k, v in original.items() if not k.endswith("position_ids")}
    assert set(exported) == set(weights)
    for key, tensor in weights.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    assert (hf_dir / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()

    before = BertModel.from_pretrained(str(minilm_dir)).eval()
    after, info = BertModel.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[101, 7592, 2088, 1010, 2129, 2024, 2017, 102], [101, 2748, 102, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = before(input_ids=ids, attention_mask=mask)
        b = after.eval()(input_ids=ids, attention_mask=mask)
        ours = UniterModel.from_pretrained(ours_dir).eval()(input_ids=ids, attention_mask=mask.bool())
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)
    real = mask.bool()
    torch.testing.assert_close(ours.last_hidden_state[real], a.last_hidden_state[real], atol=2e-5, rtol=1e-4)


def test_hf_masked_lm_and_export_with_mlm_head(tmp_path):
    """BertForMaskedLM (`bert.` prefix, tied decoder, decoder.bias) -> ours -> HF: same MLM logits."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(1)
    hf = BertForMaskedLM(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
            max_position_embeddings=20,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "hf_mlm")
    report = convert_to_ours("hf-bert", tmp_path / "hf_mlm", tmp_path / "ours")
    assert not [k for k in report.new if not k.startswith("uniter.pooler.")]  # MaskedLM has no pooler
    ours = UniterForPretraining.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours.cls["predictions"](ours(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)

    export_to_hf_bert(tmp_path / "ours", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    again = BertForMaskedLM.from_pretrained(str(tmp_path / "back")).eval()
    _, info = BertModel.from_pretrained(str(tmp_path / "back"), output_loading_info=True)
    assert not info["missing_keys"]
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, expected)


def test_roberta_positions_are_offset_by_two(tmp_path):
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
    hf.save_pretrained(tmp_path / "roberta")
    # Older HF folders hold pytorch_model.bin (a torch pickle) with the `roberta.` prefix instead.
    weights = load_file(str(tmp_path / "roberta" / "model.safetensors"))
    torch.save({f"roberta.{k}": v for k, v in weights.items()}, tmp_path / "roberta" / "pytorch_model.bin")
    (tmp_path / "roberta" / "model.safetensors").unlink()
    report = convert_to_ours("hf-bert", tmp_path / "roberta", tmp_path / "ours")
    assert report.source_kind == "hf-roberta"
    ours = UniterModel.from_pretrained(tmp_path / "ours").eval()
    assert ours.config.max_position_embeddings == 20 and ours.config.pad_token_id == 1
    ids = torch.tensor([[0, 7, 8, 9, 10, 2], [0, 11, 12, 2, 1, 1]])
    mask = ids != 1
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask], expected[mask], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- MEmoBERT / UNITER
def test_memobert_state_dict_converts_and_gives_the_same_output(tmp_path):
    model, theirs, src = memobert_source(tmp_path)
    assert any(k.endswith(".gamma") for k in theirs) and theirs[
        "uniter.img_embeddings.mask_embedding.weight"
    ].shape == (2, FACE_D)
    out = tmp_path / "ours"
    code = cli_main(
        [
            "convert",
            "--from",
            "memobert",
            "--checkpoint",
            str(src),
            "--out",
            str(out),
            "--model-config",
            str(tmp_path / "uniter-tiny.json"),
        ]
    )
    assert code == 0

    report = read_report(out)
    assert report["new"] == []
    assert set(report["ignored"]) == {
        "vfom_output.output.0.weight",
        "emo_classifier.output.3.weight",
        "uniter.embeddings.word_senti_embedding.weight",
        "optimizer_leftover.step",
        "cls.predictions.decoder.weight",  # the tie with the word embeddings, stored once
        "feat_regress.weight",  # tied to img_linear
        "speech_feat_regress.weight",  # tied to speech_linear
    }
    assert "unknown" in report["ignored"]["optimizer_leftover.step"]
    assert (
        report["converted"]["uniter.face_embeddings.feat_linear.weight"]
        == "uniter.img_embeddings.img_linear.weight"
    )

    config = UniterConfig.from_pretrained(out)
    assert (config.face.feat_dim, config.face.max_frames, config.face.soft_label_dim) == (
        FACE_D,
        6,
        FACE_CLASSES,
    )
    assert (config.speech.feat_dim, config.speech.max_frames, config.speech_type) == (SPEECH_D, 7, "own")

    loaded, info = UniterForPretraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    backbone, binfo = UniterModel.from_pretrained(out, output_loading_info=True)
    assert not binfo["missing_keys"]
    loaded.eval()
    x = inputs()
    with torch.no_grad():
        want, got = model(**x), loaded(**x)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        assert torch.equal(backbone.eval()(**x).pooler_output, want.pooler_output)
        h = want.last_hidden_state
        for head in ("face_regress", "speech_regress", "face_classifier"):
            assert torch.equal(getattr(loaded, head)(h), getattr(model, head)(h)), head
        assert torch.equal(loaded.cls["predictions"](h), model.cls["predictions"](h))
        assert torch.equal(loaded.itm(want.pooler_output), model.itm(want.pooler_output))


def test_memobert_dimension_mismatch_names_the_key(tmp_path):
    _, theirs, src = memobert_source(tmp_path)
    theirs["uniter.encoder.layer.1.attention.self.query.weight"] = torch.randn(32, 16)
    torch.save(theirs, src)
    with pytest.raises(
        UserError, match=r"uniter\.encoder\.layer\.1\.attention\.self\.query\.weight.*\(32, 16\)"
    ):
        convert_to_ours("memobert", src, tmp_path / "ours", tmp_path / "uniter-tiny.json")


def test_uniter_backbone_only_and_projection_rules():
    """A fine-tuned UNITER-style dict: `bert.` prefix, box positions, projection block, `output.*`."""
    torch.manual_seed(4)
    model = UniterModel(tiny_config(speech={"feat_dim": 0}, face={"projection": True, "soft_label_dim": 0}))
    theirs = {}
    for key, tensor in model.state_dict().items():
        name = key.replace("face_embeddings.", "img_embeddings.").replace("feat_linear", "img_linear")
        name = name.replace("feat_layer_norm", "img_layer_norm").replace("projs_linear.", "projs_linear.1.")
        name = name.replace("projs_layer_norm.", "projs_linear.3.")
        theirs["bert." + name] = torch.stack([tensor, tensor]) if name.endswith("mask_embedding") else tensor
    theirs["bert.img_embeddings.mask_embedding.weight"] = theirs.pop("bert.img_embeddings.mask_embedding")
    theirs["bert.img_embeddings.pos_linear.weight"] = torch.randn(32, 7)
    theirs["output.output.0.weight"] = torch.randn(64, 32)
    state, report = conv.convert_uniter(theirs, flavour="uniter")
    assert conv.heads_of(state) == []
    assert set(conv.backbone_only(state)) == set(model.state_dict())
    assert "box" in report.ignored["bert.img_embeddings.pos_linear.weight"]
    ours_ln = "uniter.face_embeddings.projs_layer_norm.weight"  # MEmoBERT's projection LayerNorm carries over
    assert report.converted[ours_ln] == "bert.img_embeddings.projs_linear.3.weight"
    assert torch.equal(state[ours_ln], theirs["bert.img_embeddings.projs_linear.3.weight"])
    assert "fine-tuned" in report.ignored["output.output.0.weight"]
    data = conv.infer_config(state, report=report)
    assert data["num_attention_heads"] == 1 and any("guess" in n for n in report.notes)
    assert data["face"] == {"feat_dim": FACE_D, "max_frames": 6, "projection": True}


def test_conflicting_duplicates_are_an_error():
    a = torch.zeros(3)
    with pytest.raises(UserError, match="both map to"):
        conv.convert_hf_bert({"bert.pooler.dense.bias": a, "pooler.dense.bias": a + 1})
    state, report = conv.convert_hf_bert({"bert.pooler.dense.bias": a, "pooler.dense.bias": a.clone()})
    assert list(state) == ["uniter.pooler.dense.bias"] and "duplicate" in next(iter(report.ignored.values()))


# ----------------------------------------------------------------------------- TensorFlow
def hf_to_tf_variables(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """HF BertModel weights -> Google BERT variable names (kernels stored (in, out)), plus optimiser slots."""
    out = {"global_step": np.array(1000, dtype=np.int64)}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        parts = key.split(".")
        if parts[0] == "encoder":
            parts = ["encoder", f"layer_{parts[2]}", *parts[3:]]
        name = "bert/" + "/".join(parts)
        array = tensor.numpy()
        if name.endswith("embeddings/weight"):
            name = name[: -len("/weight")]
        elif "LayerNorm" in name:
            name = name.replace("/weight", "/gamma").replace("/bias", "/beta")
        elif name.endswith("/weight"):
            name, array = name[: -len("weight")] + "kernel", array.T.copy()
        out[name] = array
        out[name + "/adam_m"] = np.zeros_like(array)
    return out


def tiny_hf_bert_state() -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(5)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24
    )
    return {k: v.clone() for k, v in BertModel(config).state_dict().items()}


def test_tf_variable_names_map_onto_hf_names():
    hf = tiny_hf_bert_state()
    from_tf, report = conv.convert_tf_bert(hf_to_tf_variables(hf))
    from_hf, _ = conv.convert_hf_bert(hf)
    assert set(from_tf) == set(from_hf)
    for key in from_hf:
        assert torch.equal(from_tf[key], from_hf[key]), key
    assert "global_step" in report.ignored and all("optimiser" in r for r in report.ignored.values())


@pytest.mark.skipif(
    not HAS_TF, reason="TensorFlow is not installed (pip install 'uniter3m[tf]'); TF round trip skipped"
)
def test_tf_checkpoint_round_trip(minilm_dir, tmp_path):
    import tensorflow as tf

    hf = load_file(str(minilm_dir / "model.safetensors"))
    variables = hf_to_tf_variables(hf)
    folder = tmp_path / "tf"
    folder.mkdir()
    with tf.Graph().as_default():
        tf_vars = [tf.compat.v1.Variable(value, name=name) for name, value in variables.items()]
        saver = tf.compat.v1.train.Saver(tf_vars)
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(folder / "bert_model.ckpt"))
    config = json.loads((minilm_dir / "config.json").read_text())
    (folder / "bert_config.json").write_text(json.dumps(config))
    convert_to_ours("tf-bert", folder, tmp_path / "ours")
    export_to_hf_bert(tmp_path / "ours", tmp_path / "hf")
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for key, tensor in hf.items():
        if not key.endswith("position_ids"):
            assert torch.equal(exported[key], tensor), key


def test_tf_without_tensorflow_says_how_to_install(tmp_path):
    if HAS_TF:
        pytest.skip("TensorFlow is installed; the missing-TensorFlow message cannot be shown")
    (tmp_path / "bert_model.ckpt.index").write_bytes(b"")
    (tmp_path / "bert_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"pip install 'uniter3m\[tf\]'"):
        convert_to_ours("tf-bert", tmp_path, tmp_path / "out")


def test_cli_refuses_a_non_empty_out_and_reports_bad_sources(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    assert (
        cli_main(
            ["convert", "--from", "hf-bert", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]
        )
        == 2
    )
    assert "--overwrite" in capsys.readouterr().err
    assert (
        cli_main(
            ["convert", "--from", "hf-bert", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o2")]
        )
        == 2
    )
    assert "config.json" in capsys.readouterr().err
    torch.save({"step": 3, "note": "no tensors"}, tmp_path / "bad.pt")
    assert (
        cli_main(
            [
                "convert",
                "--from",
                "memobert",
                "--checkpoint",
                str(tmp_path / "bad.pt"),
                "--out",
                str(tmp_path / "o3"),
            ]
        )
        == 2
    )
    assert "not a state dict" in capsys.readouterr().err
    assert not (tmp_path / "o3" / REPORT_NAME).exists()

    # Names of another family (DistilBERT) leave the encoder empty: an error, not a random model.
    from safetensors.torch import save_file

    hf = tmp_path / "distil"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps(
            {
                "model_type": "distilbert",
                "vocab_size": 40,
                "hidden_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 24,
            }
        )
    )
    save_file(
        {"distilbert.transformer.layer.0.attention.q_lin.weight": torch.zeros(16, 16)},
        hf / "model.safetensors",
    )
    assert (
        cli_main(["convert", "--from", "hf-bert", "--checkpoint", str(hf), "--out", str(tmp_path / "o4")])
        == 2
    )
    err = capsys.readouterr().err
    assert "found no source key" in err and "text-encoder weights" in err and "q_lin" in err
