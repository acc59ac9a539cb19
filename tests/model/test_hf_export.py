"""Hugging Face round trips: native directories load in transformers (text backbone), a fine-tuned
text classifier exports as BertForSequenceClassification and `pipeline("text-classification")`
predicts exactly what uniter3m does, every checkpoint directory carries its tokenizer and a card."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import transformers

from uniter3m.cli import main as cli_main
from uniter3m.errors import UserError
from uniter3m.ingest.text_db import TextDbSpec, build_text_db
from uniter3m.model.config import UniterConfig
from uniter3m.model.io import read_checkpoint
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.model.uniter import UniterModel
from uniter3m.train.config import load_finetune_config
from uniter3m.train.evaluate import evaluate_modalities
from uniter3m.train.finetune import run_finetune

transformers.logging.set_verbosity_error()

SENTENCES = {
    "ang": ["i am so angry at you", "this makes me furious", "stop shouting at me now"],
    "hap": ["what a wonderful day", "i love this so much", "that is great news"],
    "neu": ["the meeting is at noon", "please pass the salt", "it is on the table"],
    "sad": ["i miss her so much", "nobody came to my party", "i lost my dog today"],
}


def tiny_config(**extra) -> UniterConfig:
    return UniterConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def test_native_directory_loads_its_text_backbone_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = UniterForPretraining(tiny_config(face={"feat_dim": 5}), ["mlm", "face_regress"]).eval()
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForMaskedLM"]
    assert transformers.AutoConfig.from_pretrained(tmp_path).hidden_size == 32

    bert, info = transformers.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]  # every BERT weight came from the dir
    assert any("face_embeddings" in k for k in info["unexpected_keys"])  # streams are reported, not lost
    ids = torch.randint(5, 120, (3, 9))
    with torch.no_grad():
        want = ours.uniter(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool))
        got = bert.eval()(input_ids=ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-4)

    mlm, info = transformers.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    with torch.no_grad():
        logits = ours.cls.predictions(want.last_hidden_state)
        torch.testing.assert_close(mlm.eval()(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)

    # and we still read the whole model back, streams and heads included
    again = UniterForPretraining.from_pretrained(tmp_path)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_older_directories_with_uniter_prefix_still_load(tmp_path):
    """Directories written before the HF-readable format (model_type uniter3m, `uniter.` keys)."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = UniterForPretraining(tiny_config(), ["mlm"])
    state = {k: v for k, v in model.state_dict().items() if k != "cls.predictions.decoder.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    again = UniterForPretraining.from_pretrained(tmp_path)
    assert torch.equal(
        again.uniter.embeddings.word_embeddings.weight, model.uniter.embeddings.word_embeddings.weight
    )


def test_sharded_and_bin_hf_layouts_load(tmp_path, minilm_dir):
    """Any transformers BERT-family layout: model.safetensors, sharded safetensors, pytorch_model.bin."""
    bert = transformers.BertModel.from_pretrained(minilm_dir).eval()
    bert.save_pretrained(tmp_path / "sharded", max_shard_size="10MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.save(bert.state_dict(), tmp_path / "bin.pt")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes((tmp_path / "bin.pt").read_bytes())
    (tmp_path / "bin" / "config.json").write_text((minilm_dir / "config.json").read_text())
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        want = bert(input_ids=ids).last_hidden_state
    for folder in ("sharded", "bin"):
        ours = UniterModel.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            got = ours(input_ids=ids, attention_mask=torch.ones_like(ids, dtype=torch.bool)).last_hidden_state
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_hub_id_is_refused_with_how_to_get_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"local.*(hf download|huggingface-cli)"):
        read_checkpoint("bert-base-uncased", backbone=UniterModel)


# ------------------------------------------------------------------ the fine-tuned classifier
@pytest.fixture(scope="module")
def text_run(tmp_path_factory, minilm_dir):
    """A text-only run fine-tuned from the real MiniLM weights (1 epoch, 36 short utterances)."""
    root = tmp_path_factory.mktemp("hfrun")
    rows = []
    for i in range(36):
        emo = list(SENTENCES)[i % 4]
        split = "train" if i < 20 else ("valid" if i < 28 else "test")
        rows.append({"id": f"u{i:02d}", "text": SENTENCES[emo][(i // 4) % 3], "emo": emo, "split": split})
    (root / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_text_db(
        TextDbSpec(
            input=root / "t.jsonl",
            id_cols=["id"],
            text_col="text",
            tokenizer=minilm_dir,
            out=root / "txt",
            label_cols=["emo", "split"],
            lexicon="none",
            progress=False,
        )
    )
    cfg = {
        "output_dir": str(root / "run"),
        "data": {"txt_db": str(root / "txt"), "modalities": "L", "max_txt_len": 32},
        "protocol": {"name": "iemocap4", "label_column": "emo"},
        "model": {"init": str(minilm_dir), "classifier": "linear"},
        "epochs": 1,
        "batching": {"max_batch_size": 8, "max_tokens": 4096},
        "optim": {"lr": 1e-3},
        "seed": 0,
        "device": "cpu",
        "progress": False,
    }
    result = run_finetune(cfg)
    return cfg, result, rows


def test_checkpoint_dirs_carry_tokenizer_and_model_card(text_run):
    cfg, _, _ = text_run
    best = Path(cfg["output_dir"]) / "fold00-split" / "best"
    assert (best / "vocab.txt").is_file() and (best / "tokenizer_config.json").is_file()
    tok = transformers.AutoTokenizer.from_pretrained(best)
    assert tok("i love this")["input_ids"][0] == tok.cls_token_id
    card = (best / "README.md").read_text()
    assert "uniter3m convert --to hf-bert" in card and '"txt_db"' in card and "Validation metrics" in card


def test_classifier_export_matches_uniter3m_predictions_in_a_pipeline(text_run, tmp_path):
    cfg, result, rows = text_run
    best = Path(cfg["output_dir"]) / "fold00-split" / "best"
    out = tmp_path / "hf"
    assert cli_main(["convert", "--to", "hf-bert", "--checkpoint", str(best), "--out", str(out)]) == 0
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForSequenceClassification"]
    assert hf_config["id2label"] == {"0": "ang", "1": "hap", "2": "neu", "3": "sad"}
    assert (out / "README.md").is_file() and (out / "vocab.txt").is_file()

    classify = transformers.pipeline("text-classification", model=str(out), device="cpu")
    fold = result["folds"][0]
    text = {r["id"]: r["text"] for r in rows}
    ids = [p["id"] for p in fold["predictions"]]
    theirs = [o["label"] for o in classify([text[i] for i in ids])]
    assert theirs == [p["pred"] for p in fold["predictions"]]  # per utterance, as uniter3m finetune scored

    # and the same accuracy as `uniter3m evaluate` on that checkpoint
    evaluated = evaluate_modalities(load_finetune_config(cfg), str(best), ["L"])["rows"][0]["metrics"]
    gold = {p["id"]: p["gold"] for p in fold["predictions"]}
    assert len(set(theirs)) > 1  # a model that predicts one class would make the comparison weak
    wa = 100 * sum(t == gold[i] for t, i in zip(theirs, ids)) / len(ids)
    assert wa == pytest.approx(evaluated["wa"])

    # the encoder alone still exports (the fine-tuned head left out on request)
    enc = tmp_path / "enc"
    assert (
        cli_main(["convert", "--to", "hf-bert", "--checkpoint", str(best), "--out", str(enc), "--no-head"])
        == 0
    )
    assert json.loads((enc / "config.json").read_text())["architectures"] == ["BertModel"]


def test_a_multimodal_classifier_is_not_exported_as_a_text_model(text_run, tmp_path, caplog):
    cfg, _, _ = text_run
    best = Path(cfg["output_dir"]) / "fold00-split" / "best"
    copy = tmp_path / "lva"
    copy.mkdir()
    for f in best.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    spec = json.loads((copy / "finetune.json").read_text())
    (copy / "finetune.json").write_text(json.dumps({**spec, "modalities": "LVA"}))
    caplog.set_level(logging.ERROR)
    assert (
        cli_main(["convert", "--to", "hf-bert", "--checkpoint", str(copy), "--out", str(tmp_path / "x")]) == 2
    )
