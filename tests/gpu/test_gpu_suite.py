"""The GPU suite fits a device command: its steps' budgets, and the bundle's tokenizer.

The suite itself runs in `make ci` as `benchmarks/gpu_suite.sh --dry-run` (a few minutes: it
downloads the bundle's wheels); here only what is cheap to check every time.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import REPO

COMMAND_LIMIT_S = 600  # one device command; the suite leaves room for the transfers and slack


def test_the_steps_budgets_fit_one_device_command():
    plan = json.loads(
        subprocess.run(
            ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--plan"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    names = [s["name"] for s in plan["steps"]]
    assert names == ["install", "cuda_tests", "model_step", "pretrain_throughput"]
    assert all(s["budget_s"] > 0 for s in plan["steps"])
    assert plan["total"] == sum(s["budget_s"] for s in plan["steps"]) <= plan["suite_budget"] <= 480
    assert plan["suite_budget"] < COMMAND_LIMIT_S


def test_the_bundled_tokenizer_reads_the_synthetic_corpus_and_prompts(tmp_path):
    from uniter3m.data.prompts import label_word_ids, tokenize_template
    from uniter3m.data.tokenization import load_tokenizer, special_tokens

    out = tmp_path / "tokenizer"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_bundle_tokenizer.py"), str(out)],
        check=True,
        cwd=tmp_path,
    )
    tokenizer = load_tokenizer(out)
    special = special_tokens(tokenizer)
    assert special.vocab_size == 30522  # bert-base's: the shipped model configs fit it
    words = {"anger": "angry", "joy": "happy", "neutral": "neutral", "sadness": "sad"}
    assert len(set(label_word_ids(tokenizer, words, special.unk_id, "test").values())) == 4
    assert special.mask_id in tokenize_template(tokenizer, "i am [MASK] .", special.mask_id, "test")
    assert (
        special.unk_id
        not in tokenizer("well honestly i am angry today", add_special_tokens=False)["input_ids"]
    )
