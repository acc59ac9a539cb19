"""Dialogue context for the text stream (`data.context`), on real MELD / IEMOCAP text dbs built by the
real recipe with the real MiniLM tokenizer: order from the ids, layout, budget (oldest cut first),
speaker prefixes, the printed counts, and that masking and prompts never target context tokens."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from uniter3m.data.collate import Collator
from uniter3m.data.context import DialogueContext
from uniter3m.data.dataset import JoinedDataset
from uniter3m.data.prompts import add_prompt
from uniter3m.data.store import DbReader
from uniter3m.errors import ConfigError, DatabaseError


@pytest.fixture(scope="module")
def dbs(shared_data, minilm_dir, tmp_path_factory):
    from uniter3m.ingest.corpora import build_iemocap, build_meld

    out = tmp_path_factory.mktemp("ctx_db")
    build_meld(shared_data, out, minilm_dir)
    build_iemocap(shared_data, out, minilm_dir)
    return {"meld": out / "meld_txt", "iemocap": out / "iemocap6_txt"}


def dialogue(db: DbReader, prefix: str) -> list[str]:
    """Ids of one dialogue in turn order."""
    return sorted(
        (u for u in db.ids if u.rpartition("_")[0] == prefix), key=lambda u: int(u.rpartition("_")[2])
    )


def test_previous_turns_in_order_with_speakers(dbs, tokenizer):
    db = DbReader(dbs["iemocap"], kind="txt")
    turns = dialogue(db, "Ses01F_impro01")
    target = turns[4]
    plain = JoinedDataset(db, ids=[target])
    ds = JoinedDataset(db, ids=[target], context={"turns": 2, "speakers": True, "max_context_tokens": 200})
    ex, base = ds[0], plain[0]
    expected = []
    for uid in turns[2:4]:
        rec = db[uid]
        expected += tokenizer(f"{rec['labels']['speaker']} :", add_special_tokens=False)["input_ids"]
        expected += [*rec["input_ids"].tolist(), tokenizer.sep_token_id]
    expected += tokenizer(f"{db[target]['labels']['speaker']} :", add_special_tokens=False)["input_ids"]
    n = len(expected)
    assert ex["input_ids"][:n].tolist() == expected
    assert ex["input_ids"][n:].tolist() == base["input_ids"].tolist()  # the current utterance, untouched
    assert ex["ctx_flags"].tolist() == [True] * n + [False] * len(base["input_ids"])
    assert (ex["word_ids"][:n] == -1).all() and ex["word_ids"][n:].tolist() == base["word_ids"].tolist()
    assert not ex["emo_flags"][:n].any()
    assert ds.lengths[0] == plain.lengths[0] + n


def test_context_after_the_current_utterance_newest_first(dbs, tokenizer):
    db = DbReader(dbs["iemocap"], kind="txt")
    turns = dialogue(db, "Ses01F_impro01")
    target = turns[4]
    base = JoinedDataset(db, ids=[target])[0]
    ex = JoinedDataset(db, ids=[target], context={"turns": 2, "speakers": True, "position": "after"})[0]

    def spk(uid: str) -> list[int]:
        return tokenizer(f"{db[uid]['labels']['speaker']} :", add_special_tokens=False)["input_ids"]

    own, cur = spk(target), base["input_ids"].tolist()
    expected = [*own, *cur]
    for uid in (turns[3], turns[2]):  # newest first
        expected += [tokenizer.sep_token_id, *spk(uid), *db[uid]["input_ids"].tolist()]
    assert ex["input_ids"].tolist() == expected
    flags = [True] * len(own) + [False] * len(cur) + [True] * (len(expected) - len(own) - len(cur))
    assert ex["ctx_flags"].tolist() == flags
    assert ex["word_ids"][len(own) : len(own) + len(cur)].tolist() == base["word_ids"].tolist()


def test_first_turn_has_no_context_and_counts_add_up(dbs):
    db = DbReader(dbs["iemocap"], kind="txt")
    ds = JoinedDataset(db, context={"turns": 3, "max_context_tokens": 10_000})
    report = ds.context_report()
    dialogues = {u.rpartition("_")[0] for u in db.ids}
    assert report.utterances == len(db)
    assert report.with_context == len(db) - len(dialogues)  # every turn but each dialogue's first
    assert report.turns_cut == 0 and report.turns_used == report.turns_available
    first = dialogue(db, "Ses01F_impro01")[0]
    assert not ds[ds.ids.index(first)]["ctx_flags"].any()
    assert int(ds.ctx_lengths.sum()) == report.tokens


def test_budget_cuts_the_oldest_tokens_first(dbs, caplog):
    db = DbReader(dbs["iemocap"], kind="txt")
    budget = 12
    with caplog.at_level(logging.INFO, logger="uniter3m.data.dataset"):
        ds = JoinedDataset(db, max_txt_len=8, context={"turns": 3, "max_context_tokens": budget})
    report = ds.context_report()
    assert report.turns_dropped > 0 and report.turns_shortened > 0
    assert f"the token budget cut {report.turns_cut} of {report.turns_available} turns" in caplog.text
    sep = ds.special_tokens().sep_id
    checked = 0
    for i in range(0, len(ds), 97):
        ex = ds[i]
        n_ctx = int(ex["ctx_flags"].sum())
        assert n_ctx <= budget and n_ctx == ds.ctx_lengths[i]
        assert len(ex["input_ids"]) - n_ctx == min(db.length_of(ds.ids[i]), 8)  # current: max_txt_len only
        if not n_ctx:
            continue
        # the context is the END of the previous turns joined with [SEP]: what the budget kept is a suffix
        previous = dialogue(db, ds.ids[i].rpartition("_")[0])
        k = previous.index(ds.ids[i])
        joined = [t for uid in previous[max(0, k - 3) : k] for t in [*db[uid]["input_ids"].tolist(), sep]]
        assert ex["input_ids"][:n_ctx].tolist() == joined[len(joined) - n_ctx :]
        checked += 1
    assert checked > 20


def test_meld_speakers_and_split_consistent_dialogues(dbs, tokenizer):
    db = DbReader(dbs["meld"], kind="txt")
    ds = JoinedDataset(
        db, ids=["test_0_1", "train_0_1"], context={"turns": 1, "speakers": True, "max_context_tokens": 64}
    )
    for i, uid in enumerate(ds.ids):
        ex = ds[i]
        prev = f"{uid.rsplit('_', 1)[0]}_0"
        text = tokenizer.decode(ex["input_ids"][ex["ctx_flags"]])
        spk_prev, spk_cur = db[prev]["labels"]["Speaker"].lower(), db[uid]["labels"]["Speaker"].lower()
        assert text.startswith(f"{spk_prev} : {tokenizer.decode(db[prev]['input_ids'])} [SEP] {spk_cur} :")
    assert (
        ds[0]["input_ids"].tolist() != ds[1]["input_ids"].tolist()
    )  # test_0 and train_0 are different dialogues


def test_ids_without_dialogue_order_are_an_error(minilm_dir, tmp_path):
    from uniter3m.ingest.text_db import TextDbSpec, build_text_db

    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": "hello there"}) + "\n" for i in ("a1", "b2")))
    build_text_db(
        TextDbSpec(input=src, id_cols=["id"], text_col="text", tokenizer=minilm_dir, out=tmp_path / "db")
    )
    with pytest.raises(DatabaseError, match=r"db: id 'a1' carries no dialogue order.*remove data.context"):
        JoinedDataset(tmp_path / "db", context={"turns": 1})
    JoinedDataset(tmp_path / "db")  # fine without context


def test_speaker_column_must_exist(dbs):
    with pytest.raises(DatabaseError, match="speaker_column 'who' is not a label column"):
        JoinedDataset(dbs["iemocap"], context={"turns": 1, "speakers": True, "speaker_column": "who"})
    with pytest.raises(
        ConfigError,
        match=r"data.context: 1 bad key\(s\):\n  turns: Input should be greater than or equal to 1 \(got 0\)",
    ):
        JoinedDataset(dbs["iemocap"], context={"turns": 0, "max_context_tokens": 8})
    with pytest.raises(ConfigError, match=r"position: Input should be 'before' or 'after'"):
        DialogueContext.parse({"turns": 1, "position": "around"})


@pytest.mark.parametrize("position", ["before", "after"])
def test_collator_and_sampler_lengths_agree(dbs, position):
    context = {"turns": 2, "speakers": True, "max_context_tokens": 40, "position": position}
    ds = JoinedDataset(dbs["meld"], max_txt_len=10, context=context)
    rows = list(range(0, 400, 7))
    batch = Collator(ds.special_tokens(), max_txt_len=10)([ds[i] for i in rows])
    assert batch["txt_mask"].sum(1).tolist() == ds.stream_lengths[rows, 0].tolist()
    assert batch["ctx_flags"].sum(1).tolist() == ds.ctx_lengths[rows].tolist()
    # the collator's guard cuts the current utterance, never the context
    short = Collator(ds.special_tokens(), max_txt_len=2)([ds[i] for i in rows])
    assert short["ctx_flags"].sum(1).tolist() == ds.ctx_lengths[rows].tolist()
    assert ((short["txt_mask"] & ~short["ctx_flags"]).sum(1) <= 4).all()  # [CLS] + 2 + [SEP]


@pytest.mark.parametrize(("name", "position"), [("mlm", "before"), ("wwm", "before"), ("melm", "after")])
def test_masking_never_targets_context(dbs, tokenizer, name, position):
    from uniter3m.tasks.base import TaskContext, build_task

    context = {"turns": 3, "speakers": True, "max_context_tokens": 64, "position": position}
    ds = JoinedDataset(dbs["meld"], context=context)
    batch = Collator(ds.special_tokens())([ds[i] for i in range(40, 72)])
    task = build_task(name, TaskContext(ds.special_tokens(), tokenizer), mask_prob=1.0, emo_prob=1.0)
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    targets = inputs["mlm_targets"] >= 0
    assert batch["ctx_flags"].any() and not (targets & batch["ctx_flags"]).any()
    current = batch["txt_mask"] & ~batch["ctx_flags"] & (batch["word_ids"] >= 0)
    assert (targets == current).all()  # mask_prob 1: every current token, nothing else
    assert (inputs["input_ids"][batch["ctx_flags"]] == batch["input_ids"][batch["ctx_flags"]]).all()


@pytest.mark.parametrize("position", ["before", "after"])
def test_prompt_sits_beside_the_current_utterance(dbs, tokenizer, position):
    from uniter3m.tasks.base import TaskContext, build_task

    ds = JoinedDataset(dbs["meld"], context={"turns": 2, "max_context_tokens": 64, "position": position})
    rows = list(range(10, 26))
    batch = Collator(ds.special_tokens())([ds[i] for i in rows])
    verbalizer = {"neutral": "neutral", "joy": "happy", "surprise": "surprised", "anger": "angry",
                  "sadness": "sad", "disgust": "disgusted", "fear": "afraid"}  # fmt: skip
    task = build_task("prompt", TaskContext(ds.special_tokens(), tokenizer), verbalizer=verbalizer,
                      label_column="Emotion", position="before")  # fmt: skip
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    prompt = task.prompt_ids
    for b, i in enumerate(rows):
        ex = ds[i]
        current = np.flatnonzero(~ex["ctx_flags"])
        first, last = (int(current[0]), int(current[-1]) + 1) if len(current) else (0, 0)
        before, text, after = (
            ex["input_ids"][a:z].tolist() for a, z in ((0, first), (first, last), (last, None))
        )
        if position == "after":
            assert before == [] and (after == [] or after[0] == ds.special_tokens().sep_id)
        else:
            assert after == []
        row = inputs["input_ids"][b][inputs["attention_mask"][b]].tolist()
        assert row == [tokenizer.cls_token_id, *before, *prompt, *text, *after, tokenizer.sep_token_id]
        target = int(inputs["prompt_index"][b]) % inputs["input_ids"].shape[1]
        assert target == 1 + len(before) + prompt.index(ds.special_tokens().mask_id)


def test_add_prompt_cuts_context_before_the_utterance(special):
    ctx, cur = [11, 12, 13, special.sep_id], [21, 22, 23]
    ids = torch.tensor([[special.cls_id, *ctx, *cur, special.sep_id]])
    flags = torch.tensor([[False, *[True] * 4, *[False] * 4]])
    prompt = [31, special.mask_id]
    cases = {10: [12, 13, special.sep_id], 8: [special.sep_id], 7: [], 6: []}  # 7 tokens, room = max_len - 4
    for max_len, kept in cases.items():
        out, mask, pos, cut = add_prompt(ids, torch.ones_like(flags), prompt, special, position="after",
                                         max_len=max_len, ctx_flags=flags)  # fmt: skip
        row = out[0][mask[0]].tolist()
        room = max_len - 2 - len(prompt)
        assert row == [special.cls_id, *kept, *cur[: room - len(kept)], *prompt, special.sep_id]
        assert cut == 1 and int(pos[0]) == len(row) - 2
    # context after the utterance ("after" layout): its END goes first, then the utterance's end
    ids = torch.tensor([[special.cls_id, *cur, special.sep_id, 11, 12, special.sep_id]])
    flags = torch.tensor([[False, False, False, False, True, True, True, False]])
    for max_len, kept in {9: [special.sep_id, 11], 7: [], 6: []}.items():
        out, mask, pos, cut = add_prompt(ids, torch.ones_like(flags), prompt, special, position="before",
                                         max_len=max_len, ctx_flags=flags)  # fmt: skip
        room = max_len - 2 - len(prompt)
        assert out[0][mask[0]].tolist() == [
            special.cls_id,
            *prompt,
            *cur[: room - len(kept)],
            *kept,
            special.sep_id,
        ]
        assert cut == 1 and int(pos[0]) == 2


def test_config_section(dbs, minilm_dir):
    from uniter3m.train.assembly import build_dataset
    from uniter3m.train.config import load_finetune_config

    sets = [f"data.txt_db={dbs['iemocap']}", f"model.init={minilm_dir}"]
    cfg = load_finetune_config("configs/downstream/iemocap6_text_context.json", sets)
    assert cfg.data.context.turns == 3 and cfg.data.context.speakers
    assert cfg.data.max_text_tokens == cfg.data.max_txt_len + 2 + cfg.data.context.max_context_tokens
    ds = build_dataset(cfg.data, ids=["Ses01F_impro01_3"])
    assert ds[0]["ctx_flags"].any()
    with pytest.raises(ConfigError, match="turn"):
        load_finetune_config("configs/downstream/iemocap6_text_context.json", [*sets, "data.context.turn=2"])
    no_ctx = load_finetune_config("configs/downstream/iemocap6_text.json", sets)
    assert no_ctx.data.context is None and np.all(
        build_dataset(no_ctx.data, ids=["Ses01F_impro01_3"]).ctx_lengths == 0
    )
