"""Fine-tuning end to end on tiny real databases (built with the real builders) and a tiny model."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.support.runs import finetune_config, tiny_checkpoint
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError, DatabaseError, UserError
from uniter3m.evaluation.metrics import is_better
from uniter3m.ingest.text_db import TextDbSpec, build_text_db
from uniter3m.model.config import UniterConfig
from uniter3m.model.finetuning import load_finetuned
from uniter3m.model.uniter import UniterModel
from uniter3m.train.assembly import build_dataset, build_finetune_model, data_tokenizer
from uniter3m.train.config import load_finetune_config
from uniter3m.train.distributed import Backend, distributed_session
from uniter3m.train.evaluate import evaluate_modalities
from uniter3m.train.finetune import run_finetune, supervised_task
from uniter3m.train.folds import plan_protocol
from uniter3m.train.precision import Precision
from uniter3m.train.scoring import predict, set_scores


@pytest.fixture(scope="module")
def trained(dbs, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = finetune_config(dbs, tiny, out, top__class_weighted=True)
    return cfg, run_finetune(cfg)


def test_finetune_writes_metrics_predictions_summary_and_png(trained):
    cfg, result = trained
    fold = result["folds"][0]
    assert fold["sizes"] == {"train": 28, "valid": 10, "test": 10}
    assert set(fold["test"]) >= {"wa", "uar", "weighted_f1", "macro_f1", "confusion"}
    assert len(fold["predictions"]) == 10 and all(p["pred"] in fold["classes"] for p in fold["predictions"])
    assert fold["classes"] == ["ang", "hap", "neu", "sad"]  # exc merged into hap
    assert fold["history"] and all(set(h) == {"step", "valid"} for h in fold["history"])
    assert fold["best_valid"] == max(h["valid"]["uar"] for h in fold["history"])
    out = json.loads(open(f"{cfg['output_dir']}/fold00-split/metrics.json").read())
    assert out["test"]["wa"] == fold["test"]["wa"]
    summary = open(f"{cfg['output_dir']}/summary.md").read()
    assert "mean ± std" in summary and "uar" in summary
    assert open(f"{cfg['output_dir']}/summary.csv").read().startswith("fold,wa,uar,weighted_f1,macro_f1")
    assert open(f"{cfg['output_dir']}/confusion.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_each_modality_case(trained):
    cfg, result = trained
    ckpt = f"{cfg['output_dir']}/fold00-split/best"
    cases = ["L", "V", "A", "LV", "LA", "VA", "LVA"]
    res = evaluate_modalities(load_finetune_config(cfg), ckpt, cases)
    assert [r["modalities"] for r in res["rows"]] == cases
    full = res["rows"][-1]["metrics"]
    assert full["wa"] == pytest.approx(result["folds"][0]["test"]["wa"])  # same model, same test split
    assert "| LVA | 10 |" in res["table"]
    assert res["out"] == f"{cfg['output_dir']}/fold00-split"  # the table goes into a folder: the fold's
    assert json.loads(open(f"{res['out']}/modalities.json").read())["rows"] == json.loads(
        json.dumps(res["rows"])
    )


def test_evaluate_rejects_a_modality_the_databases_lack(trained, dbs, tiny):
    cfg, _ = trained
    no_speech = dict(cfg, data=dict(cfg["data"], speech_db=None, modalities="LV"))
    with pytest.raises(UserError, match=r"speech \(A\).*data.speech_db"):
        evaluate_modalities(load_finetune_config(no_speech), f"{cfg['output_dir']}/fold00-split/best", ["LA"])


def test_prompt_finetuning_predicts_only_label_words(dbs, tiny, tmp_path):
    cfg = finetune_config(
        dbs, tiny, tmp_path, model__classifier="prompt", data__modalities="L", top__epochs=1
    )
    fold = run_finetune(cfg)["folds"][0]
    assert all(p["pred"] in ("ang", "hap", "neu", "sad") for p in fold["predictions"])
    spec = json.loads((tmp_path / "fold00-split" / "best" / "finetune.json").read_text())
    assert spec["verbalizer"] == {"ang": "angry", "hap": "happy", "neu": "neutral", "sad": "sad"}
    # deterministic: scoring the saved model again gives the same predictions
    again = evaluate_modalities(load_finetune_config(cfg), str(tmp_path / "fold00-split" / "best"), ["L"])
    assert again["rows"][0]["metrics"]["wa"] == pytest.approx(fold["test"]["wa"])


def test_regression_head_reports_mosi_metrics(dbs, tiny, tmp_path):
    cfg = finetune_config(dbs, tiny, tmp_path, model__classifier="regression", top__epochs=1)
    cfg["protocol"] = {"name": "mosi", "target": "regression", "label_column": "score"}
    fold = run_finetune(cfg)["folds"][0]
    assert fold["selection_metric"] == "mae"
    assert set(fold["test"]) == {"mae", "pearson", "acc2", "f1", "acc2_nonzero", "f1_nonzero", "acc7"}


def test_label_value_outside_the_label_map(dbs, tiny, tmp_path):
    cfg = finetune_config(dbs, tiny, tmp_path)
    cfg["protocol"] = {"name": "generic", "label_column": "emo", "classes": ["ang", "hap", "neu", "sad"]}
    with pytest.raises(UserError, match=r"'exc' \(10 rows\)"):
        run_finetune(cfg)


def test_fold_without_validation_data(dbs, tiny, tmp_path):
    cfg = finetune_config(dbs, tiny, tmp_path)
    cfg["protocol"]["split_values"] = {"train": ["train", "valid"], "valid": [], "test": ["test"]}
    with pytest.raises(UserError, match="empty valid split"):
        run_finetune(cfg)


def test_resume_from_a_checkpoint_folder_needs_the_fold(dbs, tiny, tmp_path):
    with pytest.raises(UserError, match=r"--resume .*continues one fold; give that fold with --fold K"):
        run_finetune(finetune_config(dbs, tiny, tmp_path / "out"), resume=str(tmp_path / "some_checkpoint"))


def test_checkpoint_feature_dims_must_match_the_databases(dbs, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "face7", face={"feat_dim": 7})
    cfg = finetune_config(dbs, ckpt, tmp_path / "out")
    with pytest.raises(DatabaseError, match=r"7-d features but the face database .* holds 5-d"):
        run_finetune(cfg)


def _predictions(cfg: dict, ckpt: str, backend: Backend) -> dict:
    parsed = load_finetune_config(cfg)
    special = SpecialTokens.from_dict(data_tokenizer(parsed.data))
    model = load_finetuned(ckpt)
    task = supervised_task(model, plan_protocol(parsed), special)
    dataset = build_dataset(parsed.data, ids=[f"u{i:02d}" for i in range(48)])
    return predict(model, task, dataset, parsed, backend, Precision("fp32", backend.device))


def _predict_rank(rank: int, world: int, port: int, cfg: dict, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    with distributed_session("cpu") as backend:
        preds = _predictions(dict(cfg, batching={"val_max_batch_size": 5}), ckpt, backend)
        if backend.rank == 0:
            with open(out, "w") as f:
                json.dump(preds, f)


def test_predictions_are_gathered_over_ranks(trained, tmp_path):
    """Two gloo ranks each predict part of the items; the gathered result equals one process's."""

    cfg, _ = trained
    ckpt = f"{cfg['output_dir']}/fold00-split/best"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, cfg, ckpt, str(tmp_path / "p.json"))
    mp.start_processes(_predict_rank, args=args, nprocs=2, join=True, start_method="fork")
    gathered = json.loads((tmp_path / "p.json").read_text())
    single = _predictions(dict(cfg, batching={"val_max_batch_size": 5}), ckpt, Backend(torch.device("cpu")))
    assert gathered == single
    assert len(gathered) == 48


def test_cli_summarize_and_config_errors(trained, tmp_path, capsys):
    from uniter3m.cli import main

    cfg, _ = trained
    good = tmp_path / "good.json"
    good.write_text(json.dumps(cfg))
    assert main(["finetune", "--config", str(good), "--summarize"]) == 0
    assert "mean ± std" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(cfg, epoch=3, model=dict(cfg["model"], head="svm"))))
    assert main(["finetune", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "epoch: unknown key" in err and "model.head" in err
    old = tmp_path / "old.json"
    old.write_text(json.dumps(dict(cfg, train={"lr": 1e-3, "batch_size": 8})))
    assert main(["finetune", "--config", str(old)]) == 2
    err = capsys.readouterr().err
    assert "train.lr is now optim.lr" in err and "train.batch_size is now batching.max_batch_size" in err
    renamed = tmp_path / "renamed.json"  # an old key is named with its new name, beside every other bad key
    renamed.write_text(json.dumps(dict(cfg, modality_cases=["L"], epoch=3)))
    assert main(["finetune", "--config", str(renamed)]) == 2
    err = capsys.readouterr().err
    assert "2 bad key(s)" in err and "epoch: unknown key" in err
    assert "modality_cases: renamed: it is now modality_sets" in err


def test_prompt_inputs_and_verbaliser_restricted_argmax(special):
    from uniter3m.data.prompts import add_prompt
    from uniter3m.model.finetuning import FinetuneModel, HeadSpec

    torch.manual_seed(0)
    config = UniterConfig(
        vocab_size=special.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    prompt = [1045, 2572, special.mask_id, 1012]  # "i am [MASK] ."
    spec = HeadSpec(classifier="prompt", classes=["a", "b"], prompt_ids=prompt, verbalizer_ids=[3407, 6517])
    model = FinetuneModel(UniterModel(config), spec).eval()
    ids = torch.tensor(
        [[special.cls_id, 7, 8, special.sep_id], [special.cls_id, 9, special.sep_id, special.pad_id]]
    )
    mask = ids != special.pad_id
    built, built_mask, pos, cut = add_prompt(ids, mask, prompt, special)
    assert built[0].tolist() == [special.cls_id, 7, 8, *prompt, special.sep_id]
    assert built[1].tolist() == [special.cls_id, 9, *prompt, special.sep_id, special.pad_id]
    assert (built[torch.arange(2), pos] == special.mask_id).all() and built_mask.sum(1).tolist() == [8, 7]
    assert cut == 0
    out = model(input_ids=built, attention_mask=built_mask, prompt_positions=pos)
    assert out.logits.shape == (2, 2) and out.vocab_logits.shape == (2, special.vocab_size)
    assert torch.equal(out.logits, out.vocab_logits[:, [3407, 6517]])
    assert torch.equal(model.predictions(out), out.logits.argmax(-1))


def test_prompt_classifier_marks_the_learned_vectors_places_before_its_words(special):
    """soft_prompt 2: the template's first two ids are placeholders; the batch's soft_slots put vector 0
    and 1 exactly there in every row, wherever the row's text ends, and -1 everywhere else."""
    from uniter3m.tasks.base import TaskContext
    from uniter3m.tasks.supervised import SupervisedTask

    pad, mask_id = special.pad_id, special.mask_id
    template = [pad, pad, 1045, 2572, mask_id, 1012]  # [v0] [v1] "i am [MASK] ."
    task = SupervisedTask(
        TaskContext(special=special), targets={}, classifier="prompt", prompt_ids=template, soft_prompt=2
    )
    ids = torch.tensor([[special.cls_id, 7, 8, special.sep_id], [special.cls_id, 9, special.sep_id, pad]])
    inputs = task.backbone_inputs({"input_ids": ids, "txt_mask": ids != pad})
    assert inputs["input_ids"][1].tolist() == [special.cls_id, 9, *template, special.sep_id, pad]
    slots = inputs["soft_slots"].tolist()
    assert slots[0] == [-1, -1, -1, 0, 1, -1, -1, -1, -1, -1]  # after [CLS] 7 8
    assert slots[1] == [-1, -1, 0, 1, -1, -1, -1, -1, -1, -1]  # after [CLS] 9
    assert inputs["prompt_positions"].tolist() == [7, 6]  # the mask, 2 words after the vectors
    plain = SupervisedTask(
        TaskContext(special=special), targets={}, classifier="prompt", prompt_ids=template[2:]
    )
    assert "soft_slots" not in plain.backbone_inputs({"input_ids": ids, "txt_mask": ids != pad})


def test_prompt_finetuning_reads_and_trains_the_checkpoints_learned_prompt_vectors(dbs, tmp_path):
    """A checkpoint holding 2 learned prompt vectors (what a prompt task with soft_prompt: 2 leaves): the
    prompt classifier uses them by default and trains them (gradients reach them only if the batches
    use them); the saved model scores again to the same figures; another count is refused; a checkpoint
    without vectors gets fresh ones on request, as weights that start untrained."""
    held = tiny_checkpoint(tmp_path / "held", soft_prompt_tokens=2)
    start = UniterModel.from_pretrained(held).embeddings.soft_prompt.detach().clone()
    assert start.abs().sum() > 0
    prompt = {"model__classifier": "prompt", "data__modalities": "L", "top__epochs": 1}
    cfg = finetune_config(dbs, held, tmp_path / "run", **prompt)
    fold = run_finetune(cfg)["folds"][0]
    best = load_finetuned(tmp_path / "run" / "fold00-split" / "best")
    pad = SpecialTokens.from_dict(data_tokenizer(load_finetune_config(cfg).data)).pad_id
    assert best.spec.soft_prompt == 2 and best.spec.prompt_ids[:2] == [pad, pad]
    assert not torch.allclose(best.uniter.embeddings.soft_prompt, start)
    again = evaluate_modalities(
        load_finetune_config(cfg), str(tmp_path / "run" / "fold00-split" / "best"), ["L"]
    )
    assert again["rows"][0]["metrics"]["wa"] == pytest.approx(fold["test"]["wa"])

    with pytest.raises(
        ConfigError, match=r"model.soft_prompt is 3 but .*held holds 2 learned prompt vectors"
    ):
        run_finetune(finetune_config(dbs, held, tmp_path / "three", model__soft_prompt=3, **prompt))
    with pytest.raises(ConfigError, match="set model.classifier 'prompt'"):
        load_finetune_config(finetune_config(dbs, held, tmp_path / "lin", model__soft_prompt=2))

    plain = tiny_checkpoint(tmp_path / "plain")
    cfg = load_finetune_config(
        finetune_config(dbs, plain, tmp_path / "fresh", model__soft_prompt=2, **prompt)
    )
    model = build_finetune_model(cfg, plan_protocol(cfg), {"face": 5, "speech": 4}, data_tokenizer(cfg.data))
    assert model.spec.soft_prompt == 2 and "embeddings.soft_prompt" in model.new_backbone_weights


def test_finetune_writes_logs_resolved_config_and_resumes_to_the_same_weights(dbs, tiny, tmp_path):
    """A run stopped after 3 steps (checkpoint written, as a killed job leaves it) and resumed with
    --resume auto ends with the same selected weights and test figures as an uninterrupted run."""
    from safetensors.torch import load_file

    from uniter3m.train.logs import read_metrics

    base = finetune_config(
        dbs, tiny, tmp_path / "whole", top__epochs=2, top__evals_per_epoch=2, top__ckpt_every=1
    )
    whole = run_finetune(base)["folds"][0]
    cut = dict(base, output_dir=str(tmp_path / "cut"), stop_after=3)
    first = run_finetune(cut)["folds"][0]
    assert first["stopped_at"] == 3 and not (tmp_path / "cut" / "fold00-split" / "metrics.json").exists()
    resumed = run_finetune(dict(cut, stop_after=None), resume="auto")["folds"][0]
    assert resumed["test"] == whole["test"] and resumed["history"] == whole["history"]
    a = load_file(str(tmp_path / "whole" / "fold00-split" / "best" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "fold00-split" / "best" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["stop_after"] is None  # what the last invocation used
    fold_dir = tmp_path / "whole" / "fold00-split"
    train_rows = read_metrics(fold_dir, "train")
    val_rows = read_metrics(fold_dir, "val")
    assert train_rows and "loss/finetune" in train_rows[0]
    assert [r["step"] for r in val_rows] == [h["step"] for h in whole["history"]]
    assert list((fold_dir / "logs" / "tensorboard").iterdir())


@pytest.mark.slow
def test_finetune_under_torchrun_scores_the_test_split_once(dbs, tiny, tmp_path):
    """2 gloo ranks fine-tune with DDP; each test id is predicted once, and the gathered figures equal
    a one-process evaluation of the checkpoint the run selected (ranks stayed in step: no hang)."""
    import subprocess
    import sys

    cfg = finetune_config(dbs, tiny, tmp_path / "ddp", top__epochs=1)
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "uniter3m.cli", "finetune", "--config", str(path)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    metrics = json.loads((tmp_path / "ddp" / "fold00-split" / "metrics.json").read_text())
    ids = [p["id"] for p in metrics["predictions"]]
    assert sorted(ids) == [f"u{i:02d}" for i in range(38, 48)]  # the test split, each id once
    again = evaluate_modalities(
        load_finetune_config(cfg), tmp_path / "ddp" / "fold00-split" / "best", ["LVA"]
    )
    assert again["rows"][0]["metrics"]["wa"] == pytest.approx(metrics["test"]["wa"])


def test_one_text_database_per_split(dbs, tiny, tmp_path, minilm_dir):
    """A corpus shipped as train/dev/test files: one text db per split, no split column needed."""
    rows = [json.loads(line) for line in (dbs / "t.jsonl").read_text().splitlines()]
    paths = {}
    for split in ("train", "valid", "test"):
        part = tmp_path / f"{split}.jsonl"
        part.write_text(
            "".join(
                json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n"
                for r in rows
                if r["split"] == split
            )
        )
        spec = TextDbSpec(
            input=part,
            id_cols=["id"],
            text_col="text",
            tokenizer=minilm_dir,
            out=tmp_path / f"txt_{split}",
            label_cols=["emo"],
            lexicon="none",
            progress=False,
        )
        build_text_db(spec)
        paths[split] = str(tmp_path / f"txt_{split}")
    cfg = finetune_config(dbs, tiny, tmp_path / "run", top__epochs=1)
    cfg["data"]["txt_db"] = paths
    fold = run_finetune(cfg)["folds"][0]
    assert fold["sizes"] == {"train": 28, "valid": 10, "test": 10}
    assert sorted(p["id"] for p in fold["predictions"]) == [f"u{i:02d}" for i in range(38, 48)]
    cfg["protocol"]["scheme"] = "session"
    with pytest.raises(UserError, match="per split, which fixes the folds"):
        run_finetune(dict(cfg, output_dir=str(tmp_path / "run2")))


def test_select_on_picks_the_model_on_the_mean_of_the_listed_sets_only(dbs, tiny, tmp_path):
    """MEmoBERT trains on 7 sets and selects on 6; here: trained on L, V, LV, selected on L and V
    (class-weighted too: the weights travel with the batch and must never reach the backbone)."""
    sets = {"top__modality_sets": ["L", "V", "LV"], "top__select_on": ["L", "V"]}
    cfg = finetune_config(dbs, tiny, tmp_path / "run", top__class_weighted=True, **sets)
    fold = run_finetune(cfg)["folds"][0]
    for h in fold["history"]:
        valid = h["valid"]
        assert valid["uar"] == pytest.approx((valid["L_uar"] + valid["V_uar"]) / 2, abs=1e-4)
    # the two rules choose different steps: LVA best at step 1, the other six sets at step 2
    per_step = {
        1: {"L": 0.40, "V": 0.30, "A": 0.30, "LV": 0.45, "LA": 0.45, "VA": 0.35, "LVA": 0.90},
        2: {"L": 0.50, "V": 0.35, "A": 0.35, "LV": 0.50, "LA": 0.50, "VA": 0.40, "LVA": 0.50},
    }
    six = ["L", "V", "A", "LV", "LA", "VA"]
    for select_on, step in ((None, 1), (six, 2)):
        best_value = best_step = None
        for s, figures in per_step.items():
            value = set_scores({k: {"uar": v} for k, v in figures.items()}, select_on)["uar"]
            if is_better("uar", value, best_value):
                best_value, best_step = value, s
        assert best_step == step
    with pytest.raises(ConfigError, match="select_on"):
        run_finetune(
            finetune_config(dbs, tiny, tmp_path / "bad", top__modality_sets=["L", "A"], top__select_on=["LA"])
        )
