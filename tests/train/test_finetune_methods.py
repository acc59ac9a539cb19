"""Fine-tuning methods (issue 24): heads (`model.head`) and classifiers (`model.classifier`), exact
freezing, LoRA, linear probes, per-stream and sequence features, cross-modal distillation. Tiny real
databases and a tiny model (test_finetune.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.support.runs import finetune_config, tiny_checkpoint
from uniter3m.cli import main
from uniter3m.data.collate import Collator
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError, UserError
from uniter3m.fileio import write_manifest
from uniter3m.model.config import UniterConfig
from uniter3m.model.export import convert
from uniter3m.model.finetuning import FinetuneModel, HeadSpec, freeze, load_finetuned, trainable_groups
from uniter3m.model.pooling import Pooling
from uniter3m.model.uniter import UniterModel
from uniter3m.tasks.base import TaskContext
from uniter3m.tasks.distill import DistillTask
from uniter3m.train.assembly import build_dataset, data_tokenizer
from uniter3m.train.config import load_finetune_config
from uniter3m.train.evaluate import evaluate_run
from uniter3m.train.extract import extract, read_embeddings, write_embeddings
from uniter3m.train.finetune import run_finetune
from uniter3m.train.folds import plan_protocol
from uniter3m.train.probe import run_probe

STREAMS = {"face": {"feat_dim": 5}, "speech": {"feat_dim": 4}}


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    """A tiny checkpoint with face and speech streams (nothing starts fresh from it)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny3") / "model", **STREAMS)


def tiny_model(classifier: str = "linear", **spec) -> FinetuneModel:
    torch.manual_seed(0)
    cfg = UniterConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        **STREAMS,
    )
    return FinetuneModel(UniterModel(cfg), HeadSpec(classifier=classifier, classes=["a", "b", "c"], **spec))


def best_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "fold00-split" / "best" / "model.safetensors"))


# ----------------------------------------------------------------------------- heads
def test_heads_reduce_only_real_positions_and_zero_absent_streams():
    model = tiny_model().eval()
    ids = torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]])
    face_mask = torch.tensor([[True, True, False], [False, False, False]])  # row 1: no face found
    out = model.uniter(
        input_ids=ids, attention_mask=ids != 0, face_feat=torch.randn(2, 3, 5), face_mask=face_mask
    )
    h, mask = out.last_hidden_state, out.attention_mask
    mean = Pooling("mean", 16, ["text", "face", "speech"])(out)
    expected = torch.stack([h[i][mask[i]].mean(0) for i in range(2)])
    torch.testing.assert_close(mean, expected)
    per = Pooling("mean", 16, ["text", "face", "speech"], per_stream=True)(out)
    torch.testing.assert_close(per[0, 16:32], h[0, 4:6].mean(0))  # the first row's two real frames
    assert per[1, 16:].abs().sum() == 0  # no face frames, no speech stream: zeros, not NaN
    attention = Pooling("attention", 16, ["text", "face", "speech"])
    torch.testing.assert_close(attention(out), expected)  # a zero query attends uniformly: the mean
    with torch.no_grad():
        attention.key.weight.copy_(torch.eye(16) * 50)
        attention.query[0] = h[0, 2]  # a query that matches position 2 of row 0
    picked = attention(out)
    assert torch.allclose(picked[0], h[0, 2], atol=1e-3) and not torch.allclose(
        picked[0], expected[0], atol=1e-3
    )
    streams = Pooling("streams", 16, ["text", "face", "speech"])(out)
    assert streams.shape == (2, 48) and torch.isfinite(streams).all() and streams[1, 16:].abs().sum() == 0


@pytest.mark.parametrize(
    ("head", "per_stream", "names"),
    [
        ("cls", False, []),
        ("mean", True, []),
        ("attention", True, ["pool.key.bias", "pool.key.weight", "pool.query"]),
        (
            "streams",
            False,
            [f"pool.proj.{s}.{p}" for s in ("face", "speech", "text") for p in ("bias", "weight")],
        ),
    ],
)
def test_head_weight_names_and_classifier_input_size(head, per_stream, names):
    model = tiny_model("mlp", head=head, per_stream=per_stream)
    assert sorted(k for k in model.state_dict() if k.startswith("pool.")) == names
    assert model.head.net[1].in_features == (16 if head == "cls" else 48)


def test_model_head_chooses_the_readout_and_an_old_classifier_value_names_the_new_key(dbs, tiny, tmp_path):
    def model_section(**model):
        cfg = finetune_config(dbs, tiny, tmp_path)
        cfg["model"] = {"init": str(tiny), **model}
        return cfg

    streams = load_finetune_config(model_section(head="streams")).model
    assert (streams.head, streams.classifier) == ("streams", "mlp")  # the late-fusion baseline: an MLP
    assert load_finetune_config(model_section(head="mean")).model.classifier == "linear"
    assert (
        load_finetune_config(model_section(head="streams", classifier="linear")).model.classifier == "linear"
    )
    old = dict(model_section(head="mlp"), epoch=3)
    with pytest.raises(ConfigError) as err:
        load_finetune_config(old)
    assert "2 bad key(s)" in str(err.value) and "epoch: unknown key" in str(err.value)  # hides no other key
    assert (
        "model.head: model.head now chooses the readout (cls|mean|attention|streams); the classifier kind is "
        "model.classifier: mlp\n" in str(err.value) + "\n"
    )
    with pytest.raises(ConfigError, match="unknown key"):  # never shipped: no alias
        load_finetune_config(finetune_config(dbs, tiny, tmp_path, model__pool="mean"))
    with pytest.raises(ConfigError, match="prompt classifier reads its mask token"):
        load_finetune_config(
            finetune_config(dbs, tiny, tmp_path, model__head="mean", model__classifier="prompt")
        )


def test_attention_head_trains_resumes_exactly_and_refuses_hf_export(dbs, tiny, tmp_path):
    over = {"model__head": "attention", "model__per_stream": True, "top__ckpt_every": 1}
    whole_cfg = finetune_config(dbs, tiny, tmp_path / "whole", **over)
    whole = run_finetune(whole_cfg)["folds"][0]
    cut = dict(whole_cfg, output_dir=str(tmp_path / "cut"), stop_after=3)
    run_finetune(cut)
    resumed = run_finetune(dict(cut, stop_after=None), resume="auto")["folds"][0]
    assert resumed["test"] == whole["test"] and resumed["history"] == whole["history"]
    a, b = best_weights(tmp_path / "whole"), best_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pool.query"], torch.zeros_like(a["pool.query"]))  # the query learned
    spec = load_finetuned(tmp_path / "whole" / "fold00-split" / "best").spec
    assert (spec.head, spec.classifier) == ("attention", "linear")
    text = dict(whole_cfg, output_dir=str(tmp_path / "text"), data=dict(whole_cfg["data"], modalities="L"))
    text["model"] = dict(text["model"], per_stream=False, head="mean")
    run_finetune(dict(text, epochs=1))
    with pytest.raises(UserError, match="head 'mean'.*--no-head.*model.head=cls"):
        convert(tmp_path / "text" / "fold00-split" / "best", tmp_path / "hf", target_kind="hf-bert")


def test_a_run_saved_with_the_classifier_under_head_still_evaluates(dbs, tiny, tmp_path):
    """A run folder written before `model.classifier` existed (finetune.json and config.json hold the
    classifier kind under `head`, the readout under `pool`) evaluates as it did."""
    fold = run_finetune(finetune_config(dbs, tiny, tmp_path, model__head="mean", top__epochs=1))["folds"][0]
    assert (fold["head"], fold["classifier"], fold["per_stream"]) == ("mean", "linear", False)
    best = tmp_path / "fold00-split" / "best"
    for file, section in ((best / "finetune.json", None), (tmp_path / "config.json", "model")):
        saved = json.loads(file.read_text())
        record = saved[section] if section else saved
        record.update(head=record.pop("classifier"), pool=record["head"])
        file.write_text(json.dumps(saved))
    write_manifest(best)  # as that run wrote it
    spec = load_finetuned(best).spec
    assert (spec.head, spec.classifier) == ("mean", "linear")
    (result,) = evaluate_run(best, modality_sets=["LVA"])  # the run's own config.json, old layout
    assert result["rows"][0]["metrics"]["uar"] == pytest.approx(fold["test"]["uar"])


# ----------------------------------------------------------------------------- freezing
def trainable(model: FinetuneModel) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_semantics_and_the_count_per_group():
    names = {n for n, _ in tiny_model().named_parameters()}
    for value in ("none", "embeddings", "layers:1", "backbone"):
        model = tiny_model()
        model.new_backbone_weights = {"speech_embeddings.feat_linear.weight"}  # not in the checkpoint
        freeze(model, value)
        on = trainable(model)
        assert "uniter.speech_embeddings.feat_linear.weight" in on  # fresh weights never freeze
        assert {"head.net.1.weight", "head.net.1.bias"} <= on
        groups = trainable_groups(model)
        assert sum(t for t, _ in groups.values()) == sum(
            p.numel() for p in model.parameters() if p.requires_grad
        )
        if value == "none":
            assert on == names
        if value == "embeddings":  # every stream's embeddings, frames included (not only the text's)
            assert "uniter.face_embeddings.feat_linear.weight" not in on
            assert "uniter.embeddings.word_embeddings.weight" not in on
            assert "uniter.encoder.layer.0.attention.self.query.weight" in on
        if value == "layers:1":  # MEmoBERT: everything below layer 1
            assert "uniter.face_embeddings.feat_linear.weight" not in on
            assert "uniter.encoder.layer.0.output.dense.weight" not in on
            assert "uniter.encoder.layer.1.output.dense.weight" in on and "uniter.pooler.dense.weight" in on
            assert (
                groups["encoder.layer.0"][0] == 0
                and groups["encoder.layer.1"][0] == groups["encoder.layer.1"][1]
            )
        if value == "backbone":
            assert on == {
                "head.net.1.weight",
                "head.net.1.bias",
                "uniter.speech_embeddings.feat_linear.weight",
            }
    with pytest.raises(ConfigError, match="the model has 2 layers"):
        freeze(tiny_model(), "layers:3")


def test_old_freeze_keys_name_the_new_one(dbs, tiny, tmp_path):
    cfg = finetune_config(dbs, tiny, tmp_path)
    cfg["model"] = dict(cfg["model"], freeze_layers=2, freeze_embeddings=True)
    with pytest.raises(ConfigError) as err:
        load_finetune_config(cfg)
    assert 'model.freeze ("layers:N"' in str(err.value) and 'model.freeze ("embeddings")' in str(err.value)
    with pytest.raises(ConfigError, match="model.freeze 'layers:x'"):
        load_finetune_config(finetune_config(dbs, tiny, tmp_path, model__freeze="layers:x"))


def test_backbone_freeze_leaves_the_backbone_as_loaded(dbs, tiny3, tmp_path):
    run_finetune(
        finetune_config(dbs, tiny3, tmp_path, model__freeze="backbone", model__head="mean", top__epochs=1)
    )
    start = {k: v for k, v in load_file(str(tiny3 / "model.safetensors")).items()}
    best = best_weights(tmp_path)
    backbone = [k for k in best if k.startswith("bert.")]
    assert backbone and all(torch.equal(best[k], start[k.replace("bert.", "", 1)]) for k in backbone)


# ----------------------------------------------------------------------------- LoRA
def test_lora_trains_adapters_and_head_only_resumes_exactly_and_merges_on_save(dbs, tiny3, tmp_path):
    from transformers import BertModel

    lora = {"rank": 4, "alpha": 8, "target_modules": ["query", "value"]}
    base = finetune_config(
        dbs, tiny3, tmp_path / "whole", model__lora=lora, top__ckpt_every=1, optim__lr=5e-3
    )
    whole = run_finetune(base)["folds"][0]
    ckpts = sorted((tmp_path / "whole" / "fold00-split" / "checkpoints").glob("step_*"))
    trained = load_file(str(ckpts[-1] / "model" / "model.safetensors"))
    start = load_file(str(tiny3 / "model.safetensors"))
    adapters = [k for k in trained if "lora_" in k]
    assert len(adapters) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    assert any(not torch.equal(trained[k], torch.zeros_like(trained[k])) for k in adapters if "lora_B" in k)
    for key, value in trained.items():
        if key.startswith("uniter.") and "lora_" not in key:
            source = key.replace("uniter.", "", 1).replace(".base_layer", "")
            assert torch.equal(value, start[source]), key  # the backbone never moved
    cut = dict(base, output_dir=str(tmp_path / "cut"), stop_after=3)
    run_finetune(cut)
    resumed = run_finetune(dict(cut, stop_after=None), resume="auto")["folds"][0]
    assert resumed["test"] == whole["test"] and resumed["history"] == whole["history"]
    best_dir = tmp_path / "whole" / "fold00-split" / "best"
    merged = best_weights(tmp_path / "whole")
    assert not any("lora_" in k or "base_layer" in k for k in merged)  # a plain BERT-named folder
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(merged[q], start[q.replace("bert.", "", 1)])  # the adapters are in the weights
    hf = BertModel.from_pretrained(best_dir)
    torch.testing.assert_close(hf.encoder.layer[0].attention.self.query.weight, merged[q])
    assert load_finetuned(best_dir).spec.lora is None


# ----------------------------------------------------------------------------- features and probes
@pytest.mark.parametrize("suffix", [".npz", ".h5", ".safetensors"])
def test_extract_per_stream_and_sequence_round_trip(dbs, tiny3, tmp_path, suffix):
    data = load_finetune_config(finetune_config(dbs, tiny3, tmp_path)).data
    result = extract(tiny3, data, pool="mean", per_stream=True, sequence=True, device="cpu")
    n = len(result["ids"])
    assert result["stream_names"] == ["text", "face", "speech"]
    offsets, seq = result["sequence_offsets"], result["sequence"]
    for i in (0, n - 1):
        rows, which = (
            seq[offsets[i] : offsets[i + 1]],
            result["sequence_streams"][offsets[i] : offsets[i + 1]],
        )
        np.testing.assert_allclose(
            result["embeddings"][i], rows.mean(0), atol=1e-5
        )  # mean over real positions
        np.testing.assert_allclose(result["streams"]["face"][i], rows[which == 1].mean(0), atol=1e-5)
        assert (
            result["stream_frames"]["face"][i] == 1
            and result["stream_frames"]["text"][i] == (which == 0).sum()
        )
    write_embeddings(tmp_path / f"f{suffix}", result)
    back = read_embeddings(tmp_path / f"f{suffix}")
    assert back["ids"] == result["ids"] and back["stream_names"] == result["stream_names"]
    assert list(back["labels"]["emo"]) == result["labels"]["emo"]
    for key in ("embeddings", "sequence", "sequence_offsets", "sequence_streams"):
        np.testing.assert_array_equal(back[key], result[key])
    np.testing.assert_array_equal(back["streams"]["speech"], result["streams"]["speech"])
    np.testing.assert_array_equal(back["stream_frames"]["face"], result["stream_frames"]["face"])


def test_probe_selects_c_on_validation_and_writes_the_finetune_summary(dbs, tiny3, tmp_path, capsys):
    cfg = finetune_config(dbs, tiny3, tmp_path / "probe")
    data = load_finetune_config(cfg).data
    write_embeddings(tmp_path / "f.h5", extract(tiny3, data, per_stream=True, device="cpu"))
    result = run_probe(cfg, features=tmp_path / "f.h5", per_stream=True, class_weighted=True)
    fold = result["folds"][0]
    assert [h["C"] for h in fold["c_grid"]] == sorted(h["C"] for h in fold["c_grid"]) and len(
        fold["c_grid"]
    ) == 9
    assert fold["best_valid"] == max(h["valid"]["uar"] for h in fold["c_grid"])
    assert fold["test"]["uar"] >= 0.8  # the face vector carries the class: a probe that works finds it
    assert (tmp_path / "probe" / "summary.md").is_file() and (
        tmp_path / "probe" / "fold00-split" / "metrics.json"
    ).is_file()
    (tmp_path / "c.json").write_text(json.dumps(finetune_config(dbs, tiny3, tmp_path / "p2")))
    assert (
        main(["probe", "--config", str(tmp_path / "c.json"), "--checkpoint", str(tiny3), "--device", "cpu"])
        == 0
    )
    assert "uar" in capsys.readouterr().out
    saved = json.loads((tmp_path / "p2" / "fold00-split" / "metrics.json").read_text())
    assert saved["classifier"] == "probe" and saved["predictions"][0]["probs"]


# ----------------------------------------------------------------------------- distillation
@pytest.fixture(scope="module")
def teacher(dbs, tiny3, tmp_path_factory):
    """A text teacher tuned on the fold the students learn on."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = finetune_config(dbs, tiny3, out, top__epochs=3)
    cfg["data"] = dict(cfg["data"], modalities="L")
    run_finetune(cfg)
    return out


def test_distillation_at_weight_zero_is_plain_finetuning_and_fusion_is_scored(dbs, tiny3, teacher, tmp_path):
    students = {"top__modality_sets": ["A", "V"], "top__epochs": 2}
    plain = run_finetune(finetune_config(dbs, tiny3, tmp_path / "plain", **students))["folds"][0]
    distill = {"teacher": str(teacher / "{fold}" / "best"), "weight": 0.0, "temperature": 2.0}
    zero_cfg = finetune_config(dbs, tiny3, tmp_path / "zero", top__distill=distill, **students)
    zero = run_finetune(zero_cfg)["folds"][0]
    assert zero["history"] == plain["history"] and zero["test_sets"]["A"] == plain["test_sets"]["A"]
    a, b = best_weights(tmp_path / "plain"), best_weights(tmp_path / "zero")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {"teacher", "student", "A", "V"} <= set(zero["test_sets"])  # fusion is the final model


def test_the_kl_term_moves_student_logits_toward_the_teacher(dbs, tiny3, tmp_path):
    """A teacher that disagrees with the gold label (it says the next class, confidently): after the
    same steps, the student trained with the KL term is closer to it than one trained without."""
    cfg = load_finetune_config(finetune_config(dbs, tiny3, tmp_path, top__modality_sets=["A"]))
    plan = plan_protocol(cfg)
    train = plan.folds[0].train
    classes = plan.label.num_classes
    table = {
        i: {"logits": (6.0 * torch.eye(classes)[(plan.targets[i] + 1) % classes]).tolist()} for i in train
    }
    special = SpecialTokens.from_dict(data_tokenizer(cfg.data))
    batch = Collator(special)([build_dataset(cfg.data, ids=train)[j] for j in range(len(train))])

    def kl_after_training(weight: float) -> float:
        torch.manual_seed(0)
        model = FinetuneModel(
            UniterModel.from_pretrained(tiny3), HeadSpec("linear", list(plan.label.classes))
        )
        task = DistillTask(
            TaskContext(special=special),
            targets=plan.targets,
            teacher=table,
            weight=weight,
            modality_sets=["A"],
        )
        inputs = task.prepare(batch, torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(15):
            optimizer.zero_grad()
            task.forward(model, inputs).loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            return float(task.forward(model, inputs).metrics["kl"][0]) / len(train)

    assert kl_after_training(5.0) < 0.6 * kl_after_training(0.0)


# ----------------------------------------------------------------------------- a checkpoint per fold
def test_model_init_and_probe_checkpoint_read_each_folds_own_folder(dbs, tiny3, tmp_path):
    """ "{fold}" in model.init / probe --checkpoint names the fold folder: a fold starts from ITS model
    (e.g. pretrained on its training speakers only), and a fold without one is a clear error."""
    own = tmp_path / "pre" / "fold00-split" / "model"
    model = UniterModel.from_pretrained(str(tiny3))
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight.add_(0.5)  # unlike tiny3
    model.save_pretrained(own)
    template = str(tmp_path / "pre" / "{fold}" / "model")
    result = run_finetune(
        finetune_config(
            dbs, tiny3, tmp_path / "ft", model__init=template, model__freeze="backbone", top__epochs=1
        )
    )["folds"][0]
    assert result["init"] == str(own)
    best, start = best_weights(tmp_path / "ft"), load_file(str(own / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(best[f"bert.{key}"], start[key])
    assert not torch.equal(start[key], load_file(str(tiny3 / "model.safetensors"))[key])
    probe = run_probe(finetune_config(dbs, tiny3, tmp_path / "probe"), checkpoint=template, device="cpu")
    assert probe["folds"][0]["features"].startswith(str(own))
    missing = str(tmp_path / "none" / "{fold}" / "model")
    with pytest.raises(UserError, match="fold00-split"):
        run_finetune(finetune_config(dbs, tiny3, tmp_path / "ft2", model__init=missing))
    with pytest.raises(UserError, match="fold00-split has no model folder"):
        run_probe(finetune_config(dbs, tiny3, tmp_path / "probe2"), checkpoint=missing, device="cpu")
