"""DataLoader workers come from one budget per rank, shared by the tasks by ratio (issue 26 item 5):
one loader per task with `cores - 1` workers each started 64 processes per rank for 8 objectives."""

from __future__ import annotations

import logging

import pytest

from tests.support import REPO
from tests.support.runs import FULL_MIX
from uniter3m.config import read_json
from uniter3m.train.config import BatchingConfig, TaskConfig
from uniter3m.train.loaders import TaskStream, share_workers


def _ratios(config: str) -> list[float]:
    return [
        TaskConfig.model_validate(t).ratio for t in read_json(REPO / "configs" / "pretrain" / config)["tasks"]
    ]


@pytest.mark.parametrize(
    ("ratios", "cores", "ranks", "expected"),
    [
        # the 12 objectives of the full mix, equal ratios, on a 16-core node
        ([1.0] * len(FULL_MIX), 16, 2, [1] * 7 + [0] * 5),  # 7 per rank: 7 objectives get one
        ([1.0] * len(FULL_MIX), 16, 1, [2, 2, 2] + [1] * 9),  # 15: one each, 3 left to the first
        # memobert_base.json: melm_wwm 2, face_mrfr 1, face_mrc 1, speech_mrfr 1, face_fom .5, speech_fom .5,
        # itm 1, prompt_cross 1 (sum 8)
        (_ratios("memobert_base.json"), 16, 1, [3, 2, 2, 2, 1, 1, 2, 2]),
        (_ratios("memobert_base.json"), 16, 2, [2, 1, 1, 1, 0, 0, 1, 1]),
        (_ratios("memobert_base.json"), 16, 8, [1, 0, 0, 0, 0, 0, 0, 0]),  # 1 each: 2 - 1
        # demo.json: 11 objectives, ratios 3 3 .5 .5 .5 .5 .5 3 .5 1 1 (sum 14)
        (_ratios("demo.json"), 16, 2, [2, 2, 0, 0, 0, 0, 0, 2, 0, 1, 0]),
    ],
)
def test_the_budget_is_cores_per_rank_minus_one_shared_by_ratio(ratios, cores, ranks, expected):
    budget = BatchingConfig(num_workers="auto").workers_for("cuda", ranks, cores=cores)
    assert budget == cores // ranks - 1
    assert share_workers(budget, ratios) == expected
    assert sum(expected) == budget  # the whole budget, never more


def test_auto_on_the_cpu_and_an_explicit_total():
    assert BatchingConfig(num_workers="auto").workers_for("cpu", 1, cores=16) == 0  # the step uses the cores
    assert BatchingConfig(num_workers="auto").workers_for("cuda", 16, cores=16) == 0  # no core to spare
    assert BatchingConfig(num_workers=5).workers_for("cuda", 2, cores=16) == 5  # a number is the total
    assert share_workers(5, [1.0]) == [5]  # one task (fine-tuning) gets all of it


def test_the_loaders_of_a_run_get_their_share(tiny_dbs, tmp_path, monkeypatch, caplog):
    from tests.support.runs import pretrain_config
    from uniter3m.train.pretrain import run_pretrain

    cfg = pretrain_config(tiny_dbs, tmp_path / "run", steps=4)
    for task, ratio in zip(cfg["tasks"], (2.0, 1.0, 1.0, 0.5), strict=True):
        task["ratio"] = ratio
    cfg["batching"]["num_workers"] = 3
    built: dict[str, int] = {}
    original = TaskStream.__init__

    def record(self, task, *args, **kwargs):  # the real constructor; what its DataLoader was given
        original(self, task, *args, **kwargs)
        built[task.name] = self.loader.num_workers

    monkeypatch.setattr(TaskStream, "__init__", record)
    with caplog.at_level(logging.INFO, logger="uniter3m"):
        run_pretrain(cfg)
    assert built == {"mlm": 1, "face_mrfr": 1, "speech_fom": 1, "itm": 0}  # shares 1.3 .67 .67 .33
    logged = [r.getMessage() for r in caplog.records if "DataLoader workers" in r.getMessage()]
    assert logged == ["DataLoader workers of each rank, by task: mlm 1, face_mrfr 1, speech_fom 1, itm 0"]
