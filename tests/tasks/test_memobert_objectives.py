"""MEmoBERT's objective rules as options (issue 25): each option's statistic against its analytic value,
far enough from the other rule's value that the test fails under the other rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.support import REPO
from uniter3m.data.collate import Collator
from uniter3m.data.lexicon import load_emotion_lexicon
from uniter3m.data.store import DbReader
from uniter3m.errors import ConfigError
from uniter3m.ingest.text_db import TextDbSpec, build_text_db
from uniter3m.model.config import UniterConfig
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.tasks.base import TaskContext, build_task
from uniter3m.tasks.masking import SpanSpec, choose_span_units, emotion_frames, overlap_coverage

N_WORDS, N_EMO = 10, 2  # every sentence: 10 single-piece words, 2 of them NRC emotion words
EMOTION = ["happy", "angry", "love", "hate", "terrible", "wonderful", "joy", "cry"]
PLAIN = ["the", "we", "went", "to", "shop", "and", "then", "it", "was", "on", "in", "at", "by", "a"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def melm_batches(minilm_dir, special, tmp_path_factory):
    """A real text db (NRC lexicon) of 600 sentences, collated in batches of 50."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(600):
        words = list(rng.choice(PLAIN, N_WORDS - N_EMO)) + list(rng.choice(EMOTION, N_EMO, replace=False))
        rng.shuffle(words)
        rows.append({"id": f"s{i:03d}", "text": " ".join(words), "emotion": "joy"})
    out = tmp_path_factory.mktemp("melm") / "txt"
    spec = TextDbSpec(id_cols=["id"], text_col="text", tokenizer=minilm_dir, out=out, label_cols=["emotion"])
    build_text_db(spec, rows)
    db = DbReader(out)
    examples = []
    for key in db.ids:
        rec = db[key]
        assert len(rec["input_ids"]) == N_WORDS and int(rec["emo_flags"].sum()) == N_EMO
        examples.append(
            {
                "id": key,
                "input_ids": np.asarray(rec["input_ids"], np.int64),
                "word_ids": np.asarray(rec["word_ids"], np.int64),
                "emo_flags": np.asarray(rec["emo_flags"], bool),
                "labels": rec["labels"],
            }
        )
    collate = Collator(special)
    return [collate(examples[k : k + 50]) for k in range(0, len(examples), 50)]


def target_rates(task, batches, repeats: int) -> tuple[float, float]:
    """Measured share of emotion / other tokens that became targets."""
    generator = torch.Generator().manual_seed(0)
    hit = np.zeros(2)
    total = np.zeros(2)
    for _ in range(repeats):
        for batch in batches:
            targets = task.prepare(batch, generator)["mlm_targets"] >= 0
            real = batch["txt_mask"].bool()
            real[:, 0] = False
            real &= batch["input_ids"] != task.special.sep_id
            emo = batch["emo_flags"].bool()
            for k, part in enumerate((emo & real, ~emo & real)):
                hit[k] += (targets & part).sum().item()
                total[k] += part.sum().item()
    return hit[0] / total[0], hit[1] / total[1]


def expected_rates(rule: str, unit: str, n: int = N_WORDS, e: int = N_EMO) -> tuple[float, float]:
    """Analytic target rates (emotion, other) of a sentence of n units, e of them emotion units
    (mask_prob 0.15, emo_prob 0.5); "at least one" adds one uniform unit when nothing was drawn."""
    p_other = max(0.15 * n - 0.5 * e, 0) / (n - e)
    if rule == "memobert" and unit == "token":
        none = 0.5**e  # no emotion token drawn: the sentence is masked as plain MLM
        mlm = 0.15 + 0.85**n / n  # MLM with its "at least one"
        return 0.5 + none * mlm, none * mlm
    if rule == "memobert":  # word: weighted probabilities, no "at least one"
        return 0.5, p_other
    none = 0.5**e * (1 - p_other) ** (n - e)
    return 0.5 + none / n, p_other + none / n


# (task, rule) -> the issue's measured figures (emotion, other; None: not reported), for the record
ISSUE_FIGURES = {
    ("melm", "memobert"): (None, 0.039),
    ("melm", "weighted"): (None, 0.075),
    ("melm_wwm", "memobert"): (0.49, 0.064),
    ("melm_wwm", "weighted"): (0.51, 0.076),
}


@pytest.mark.parametrize("name,rule", list(ISSUE_FIGURES))
def test_melm_target_rates_follow_the_chosen_rule(melm_batches, tokenizer, special, name, rule):
    """Tolerance: 0.006 absolute, over 600 sentences x 10 draws (4,800 emotion and 48,000 other
    tokens): more than 4 standard errors of the sentence-clustered rates, and less than half of the
    gap between the two rules (other tokens 0.042 vs 0.077 for melm, 0.062 vs 0.077 for melm_wwm)."""
    task = build_task(name, TaskContext(special, tokenizer), rule=rule)
    emo, other = target_rates(task, melm_batches, repeats=10)
    want_emo, want_other = expected_rates(rule, task.unit)
    assert other == pytest.approx(want_other, abs=0.006)
    assert emo == pytest.approx(want_emo, abs=0.02)
    issue_emo, issue_other = ISSUE_FIGURES[(name, rule)]
    assert want_other == pytest.approx(issue_other, abs=0.004)  # the issue's db: about 10 words, 2 emotional
    if issue_emo is not None:
        assert want_emo == pytest.approx(issue_emo, abs=0.012)


def test_memobert_wwm_always_masks_and_token_rule_keeps_80_10_10(melm_batches, tokenizer, special):
    context = TaskContext(special, tokenizer)
    wwm = build_task("melm_wwm", context, rule="memobert")
    token = build_task("melm", context, rule="memobert")
    generator = torch.Generator().manual_seed(1)
    for task, masked_share in ((wwm, 1.0), (token, 0.8)):
        hits = total = 0
        for batch in melm_batches:
            inputs = task.prepare(batch, generator)
            targets = inputs["mlm_targets"] >= 0
            hits += (inputs["input_ids"][targets] == special.mask_id).sum().item()
            total += targets.sum().item()
        assert hits / total == pytest.approx(masked_share, abs=0.03)


def test_lexicons_nrc8_nrc6_and_a_word_list(tmp_path):
    nrc, nrc6 = load_emotion_lexicon("nrc"), load_emotion_lexicon("nrc6")
    assert (len(nrc.words), len(nrc6.words)) == (4463, 3462)
    assert "trust" in nrc.words and "trust" not in nrc6.words  # trust only: NRC's 8, not MEmoBERT's 6
    assert nrc.categories[nrc.words["happy"]] == nrc6.categories[nrc6.words["happy"]] == "joy"
    listing = tmp_path / "words.txt"
    listing.write_text("glad\tjoy\nfurious\tanger\nmeh\n", encoding="utf-8")
    own = load_emotion_lexicon(str(listing))
    assert own.categories == ("anger", "emotion", "joy") and own.words == {"furious": 0, "meh": 1, "glad": 2}


def test_run_time_lexicon_reflags_the_batch_and_the_head_target_is_the_word_category(tokenizer, special):
    words = ["i", "trust", "you", "and", "hate", "the", "happy", "shop"]
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    example = {
        "id": "u0",
        "input_ids": np.asarray(enc["input_ids"], np.int64),
        "word_ids": np.asarray(enc.word_ids(), np.int64),
        "emo_flags": np.zeros(len(words), bool),  # the db says: no emotion word at all
        "labels": {},
    }
    batch = Collator(special)([example] * 400)
    context = TaskContext(special, tokenizer)
    # rows targeting "trust": drawn as an emotion word (0.5) under NRC's 8, only by the plain-MLM
    # fallback (0.5^2 of rows x 0.15 + its "at least one") under MEmoBERT's 6
    for lexicon, trust_rate in (("nrc", 0.5 + 0.5**3 * 0.15), ("nrc6", 0.5**2 * (0.15 + 0.85**8 / 8))):
        task = build_task("melm", context, rule="memobert", lexicon=lexicon, emotion_head=True)
        lex = load_emotion_lexicon(lexicon)
        assert task.emo_word_classes == lex.num_classes
        inputs = task.prepare(batch, torch.Generator().manual_seed(0))
        targets = inputs["mlm_targets"]
        index = inputs["mlm_index"]
        gold_words = tokenizer.convert_ids_to_tokens(targets.flatten()[index].tolist())
        expected = [lex.words[w] + 1 if w in lex.words else 0 for w in gold_words]
        assert inputs["emo_word_targets"].tolist() == expected
        trust = tokenizer.convert_tokens_to_ids("trust")
        assert (targets == trust).any(1).float().mean().item() == pytest.approx(trust_rate, abs=0.08)


def test_emotion_head_trains_jointly_and_round_trips(tmp_path, tokenizer, special):
    config = tiny_text_config(special)
    task = build_task("melm", TaskContext(special, tokenizer), lexicon="nrc6", emotion_head=True)
    model = UniterForPretraining(config, task.heads, emo_word_classes=task.emo_word_classes)
    words = ["we", "hate", "the", "happy", "shop"]
    enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
    example = {
        "id": "u0",
        "input_ids": np.asarray(enc["input_ids"], np.int64),
        "word_ids": np.asarray(enc.word_ids(), np.int64),
        "emo_flags": np.zeros(len(words), bool),
        "labels": {},
    }
    inputs = task.prepare(Collator(special)([example] * 8), torch.Generator().manual_seed(0))
    out = task(model, inputs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and "emo_acc" in out.metrics
    assert model.emo_word_classifier.net[-1].weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "m")
    again = UniterForPretraining.from_pretrained(tmp_path / "m")
    assert again.emo_word_classes == 7 and "emo_word_classifier" in again.heads
    with pytest.raises(ConfigError, match="lexicon"):
        build_task("melm", TaskContext(special, tokenizer), emotion_head=True)
    with pytest.raises(ConfigError, match="melm"):
        build_task("mlm", TaskContext(special, tokenizer), rule="memobert")


def test_memobert_emotion_word_head_converts_to_ours(tmp_path, special):
    """MEmoBERT's `emomelm_classifier.output.{0,2,3}` (Linear(H, 2H), GELU, LayerNorm, Linear) lands in
    `emo_word_classifier.net.{1,3,4}` and computes what their Sequential computes."""
    from uniter3m.model.export import convert_to_ours

    torch.manual_seed(0)
    ours = UniterForPretraining(tiny_text_config(special), ["mlm", "emo_word_classifier"], emo_word_classes=5)
    theirs = {}
    for key, tensor in ours.state_dict().items():
        for layer, index in (("1", "0"), ("3", "2"), ("4", "3")):
            key = key.replace(f"emo_word_classifier.net.{layer}.", f"emomelm_classifier.output.{index}.")
        theirs[key] = tensor.clone()
    torch.save(theirs, tmp_path / "model_step_10.pt")
    (tmp_path / "memobert.json").write_text(json.dumps({"num_attention_heads": 2}))
    report = convert_to_ours(
        "memobert", tmp_path / "model_step_10.pt", tmp_path / "out", tmp_path / "memobert.json"
    )
    assert report.converted["emo_word_classifier.net.4.weight"] == "emomelm_classifier.output.3.weight"
    assert not [k for k in report.ignored if k.startswith("emomelm")]
    loaded = UniterForPretraining.from_pretrained(tmp_path / "out").eval()
    assert loaded.emo_word_classes == 5 and "emo_word_classifier" in loaded.heads
    x = torch.randn(6, 32)
    w = {k: theirs[f"emomelm_classifier.output.{k}"] for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    hidden = torch.nn.functional.layer_norm(
        torch.nn.functional.gelu(x @ w["0.weight"].T + w["0.bias"]), (64,), w["2.weight"], w["2.bias"], 1e-12
    )
    want = (
        hidden @ theirs["emomelm_classifier.output.3.weight"].T + theirs["emomelm_classifier.output.3.bias"]
    )
    with torch.no_grad():
        assert torch.allclose(loaded.emo_word_classifier(x), want, atol=1e-6)


def tiny_text_config(special) -> UniterConfig:
    return UniterConfig(
        vocab_size=special.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )


# ------------------------------------------------------------------------------------------ frames


def masked_share(spec: SpanSpec, length: int, rate: float, clips: int = 4000) -> float:
    real = torch.ones(clips, length, dtype=torch.bool)
    units = choose_span_units(real, rate, spec, torch.Generator().manual_seed(0))
    return (units >= 0).float().mean().item()


def test_overlapping_spans_cover_the_analytic_share_and_ours_the_exact_ratio():
    """64-frame clips, 3-frame spans, ratio 0.2: MEmoBERT's overlapping spans cover 17.8 % (the
    analytic `overlap_coverage`), ours exactly 20 %. Tolerance 0.003: about 6 standard errors
    over 4,000 clips, a tenth of the gap between the rules."""
    want = overlap_coverage(64, 3, 0.2)
    assert want == pytest.approx(0.178, abs=0.001)
    assert masked_share(SpanSpec((3,), overlap=True), 64, 0.2) == pytest.approx(want, abs=0.003)
    assert masked_share(SpanSpec((3,)), 64, 0.2) == pytest.approx(0.2, abs=0.003)


def test_single_span_and_mixed_ratios():
    # one span of floor(T * ratio) frames: 12 of 64 at 0.2, always, and contiguous
    real = torch.ones(200, 64, dtype=torch.bool)
    units = choose_span_units(real, 0.2, SpanSpec(single=True), torch.Generator().manual_seed(0))
    assert ((units >= 0).sum(1) == 12).all()
    first = (units >= 0).float().argmax(1)
    assert all(bool((units[b, first[b] : first[b] + 12] >= 0).all()) for b in range(200))
    # mixed: one (ratio, length) drawn per clip, so the share is the mean of the grid's coverages
    rates, lengths = (0.1, 0.3, 0.5), (1, 2, 3)
    spec = SpanSpec(lengths, rates, overlap=True)
    want = np.mean([overlap_coverage(64, k, r) for r in rates for k in lengths])
    assert masked_share(spec, 64, 0.15, clips=6000) == pytest.approx(want, abs=0.006)
    with pytest.raises(ConfigError, match="exclude"):
        SpanSpec.parse({"single": True, "overlap": True}, "test")


def frame_actions(special, **options) -> dict[str, torch.Tensor]:
    """face_mrfr's masking of 500 clips of 64 frames: targets, the mask-vector frames and the
    frames replaced by other frames (every frame is distinct, so a changed value is a replacement)."""
    task = build_task("face_mrfr", TaskContext(special), mask_prob=0.2, **options)
    feat = torch.randn(500, 64, 4)
    batch = {
        "input_ids": torch.tensor([[special.cls_id, special.sep_id]] * 500),
        "txt_mask": torch.ones(500, 2, dtype=torch.bool),
        "face_feat": feat,
        "face_mask": torch.ones(500, 64, dtype=torch.bool),
    }
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    replaced = (inputs["face_feat"] != feat).any(-1)
    return {"targets": inputs["frame_targets"], "mask": inputs["face_frame_mask"], "random": replaced}


def test_span_replace_rates_inside_the_span_mapping(special):
    """`span.replace` sets each span's [mask, random, keep]: MEmoBERT's [1, 0, 0] shows every target
    as the mask vector; the default 80/10/10 and [0.5, 0.5, 0] give those shares of the target
    frames (per span, so the tolerance 0.03 is about 4 standard errors of ~2,000 spans)."""
    memobert = frame_actions(special, span={"length": 3, "overlap": True, "replace": [1, 0, 0]})
    targets = memobert["targets"]
    assert torch.equal(targets, memobert["mask"]) and not memobert["random"].any()
    assert targets.float().mean().item() == pytest.approx(overlap_coverage(64, 3, 0.2), abs=0.005)
    for replace, (mask, random) in ((None, (0.8, 0.1)), ([0.5, 0.5, 0], (0.5, 0.5))):
        span = {"length": 3} if replace is None else {"length": 3, "replace": replace}
        out = frame_actions(special, span=span)
        n = out["targets"].sum().item()
        assert out["mask"].sum().item() / n == pytest.approx(mask, abs=0.03)
        assert (out["random"] & out["targets"]).sum().item() / n == pytest.approx(random, abs=0.03)
        assert not (out["mask"] | out["random"])[~out["targets"]].any()
    with pytest.raises(ConfigError, match="replace is given twice"):
        frame_actions(special, span={"length": 3, "replace": [1, 0, 0]}, replace=[1, 0, 0])
    with pytest.raises(ConfigError, match="sum to 1"):
        frame_actions(special, span={"length": 3, "replace": [1, 1, 0]})


def test_emotion_frames_pick_frames_far_from_neutral():
    """Half of each clip's frames are neutral (soft label one-hot on class 0): emotion selection
    never picks them while random selection would pick them half of the time."""
    clips, length = 300, 20
    soft = torch.zeros(clips, length, 4)
    neutral = torch.rand(clips, length, generator=torch.Generator().manual_seed(1)).argsort(1) < length // 2
    soft[..., 0] = neutral.float()
    soft[..., 2] = (~neutral).float() * 0.9
    soft[..., 0] += (~neutral).float() * 0.1
    real = torch.ones(clips, length, dtype=torch.bool)
    units = emotion_frames(real, soft, 0.25, 0, torch.Generator().manual_seed(0))
    chosen = units >= 0
    assert chosen.sum(1).float().mean().item() == pytest.approx(0.25 * length, abs=0.2)
    assert (chosen & neutral).sum().item() == 0
    assert math.isclose((chosen & ~neutral).sum().item(), chosen.sum().item())


# ---------------------------------------------------------------------------------------- matching


def matching_batch(tokenizer, special, n: int = 8) -> dict:
    """n utterances, emotion alternating a/b; each face frame holds its row's index."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(n):
        enc = tokenizer(f"we went to the shop number {i}", add_special_tokens=False)
        examples.append(
            {
                "id": f"u{i}",
                "input_ids": np.asarray(enc["input_ids"], np.int64),
                "word_ids": np.asarray(enc.word_ids(), np.int64),
                "emo_flags": np.zeros(len(enc["input_ids"]), bool),
                "labels": {"emotion": "ab"[i % 2]},
                "face": np.full((4 + i % 3, 6), float(i), np.float32),
                "speech": rng.normal(size=(5, 5)).astype(np.float32),
            }
        )
    return Collator(special)(examples)


def tiny_model(special, heads=()) -> UniterForPretraining:
    config = UniterConfig(
        vocab_size=special.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        face={"feat_dim": 6, "max_frames": 16},
        speech={"feat_dim": 5, "max_frames": 16},
    )
    return UniterForPretraining(config, heads)


def test_itm_rank_scores_the_positive_against_in_batch_and_queued_negatives(tokenizer, special):
    batch = matching_batch(tokenizer, special)
    model = tiny_model(special)
    task = build_task("itm_rank", TaskContext(special, tokenizer), negatives=20)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(3):
        out = task(model, task.prepare(batch, generator))
        out.loss.backward()
        seen.append(out.metrics["candidates"][0].item() / out.metrics["candidates"][1].item())
        assert out.n_targets.item() == 8 and torch.isfinite(out.loss)
    # 8 in-batch candidates, then + the queue up to K = 20 negatives (K + 1 = 21 candidates)
    assert seen == [8, 16, 21]
    assert model.uniter.embeddings.word_embeddings.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("same_emotion,chance", [(None, 1 / 8), ("exclude", 1 / 5), ("positive", 4 / 8)])
def test_itm_rank_same_emotion_candidates(tokenizer, special, same_emotion, chance):
    """8 utterances, 4 per emotion: "exclude" leaves 1 + 4 candidates, "positive" makes 4 of 8 positive."""
    options = {} if same_emotion is None else {"label_column": "emotion", "same_emotion": same_emotion}
    task = build_task("itm_rank", TaskContext(special, tokenizer), queue=0, **options)
    model = tiny_model(special).eval()
    out = task(model, task.prepare(matching_batch(tokenizer, special), torch.Generator().manual_seed(0)))
    value, total = out.metrics["chance"]
    assert (value / total).item() == pytest.approx(chance)


@pytest.mark.parametrize("same_emotion", ["exclude", "positive"])
def test_emotion_itm_negatives_come_from_another_emotion(tokenizer, special, same_emotion):
    batch = matching_batch(tokenizer, special)
    task = build_task(
        "emotion_itm",
        TaskContext(special, tokenizer),
        label_column="emotion",
        same_emotion=same_emotion,
        negative_streams={"V": 1.0},
    )
    generator = torch.Generator().manual_seed(0)
    foreign_positive = negatives = 0
    for _ in range(40):
        inputs = task.prepare(batch, generator)
        donor = inputs["face_feat"][:, 0, 0].long()
        own = torch.arange(8)
        swapped = donor != own
        same = donor % 2 == own % 2
        targets = inputs["itm_targets"]
        assert torch.equal(targets == 0, swapped & ~same)  # a negative is always another emotion's
        foreign_positive += int((swapped & (targets == 1)).sum())
        negatives += int((targets == 0).sum())
    assert negatives > 60  # 0.5 of 320 rows drawn; "positive": 4 of 7 donors are of another emotion
    assert (foreign_positive > 0) == (same_emotion == "positive")
    with pytest.raises(ConfigError, match="emotion_itm"):
        build_task("itm", TaskContext(special, tokenizer), label_column="emotion")


# ----------------------------------------------------------------------------------------- prompts


def test_several_templates_and_per_case_condition_prompts(tokenizer, special):
    batch = matching_batch(tokenizer, special)
    context = TaskContext(special, tokenizer)
    common = {"verbalizer": {"a": "happy", "b": "angry"}, "label_column": "emotion"}
    said, heard = tokenizer.convert_tokens_to_ids(["says", "hear"])
    task = build_task(
        "prompt",
        context,
        case_templates={"L": "the text says [MASK] .", "LA": ["i hear [MASK] .", "i see and hear [MASK] ."]},
        **common,
    )
    generator = torch.Generator().manual_seed(0)
    kinds = {"L": 0, "LA": 0, "LA2": 0}
    for _ in range(60):
        inputs = task.prepare(batch, generator)
        ids = inputs["input_ids"][0]
        has_speech = inputs.get("speech_feat") is not None
        assert inputs.get("face_feat") is None  # neither case keeps the face
        assert bool((ids == said).any()) == (not has_speech) and bool((ids == heard).any()) == has_speech
        see = tokenizer.convert_tokens_to_ids("see")
        kinds["L" if not has_speech else "LA2" if bool((ids == see).any()) else "LA"] += 1
    assert min(kinds.values()) >= 8  # each case, and each of LA's two templates, drawn
    with pytest.raises(ConfigError, match="case_templates"):
        build_task(
            "prompt_cross",
            context,
            case_templates={"L": "x [MASK] ."},
            **common,  # 6 of its 7 sets lack one
        )


def test_soft_prompt_vectors_learn_the_prompt_and_round_trip(tmp_path, tokenizer, special):
    """`soft_prompt: 3`: three learned vectors stand before the template's words (placeholder ids,
    no vocabulary row); they get gradients, and training them ALONE (every other weight frozen and
    equal) turns the [MASK] prediction to either label word; save/load keeps them."""
    batch = matching_batch(tokenizer, special)
    options = {
        "verbalizer": {"a": "happy", "b": "angry"},
        "label_column": "emotion",
        "loss_over": "verbalizer",
    }
    task = build_task(
        "prompt", TaskContext(special, tokenizer), soft_prompt=3, modality_sets=["L"], **options
    )
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    slots, ids = inputs["soft_slots"], inputs["input_ids"]
    template = task.prompt_ids[3:]
    for row, mask_at in enumerate((inputs["prompt_targets"] >= 0).int().argmax(1).tolist()):
        start = mask_at - template.index(special.mask_id) - 3
        assert slots[row, start : start + 3].tolist() == [0, 1, 2] and int((slots[row] >= 0).sum()) == 3
        assert ids[row, start + 3 : start + 3 + len(template)].tolist() == template
    assert (ids[slots >= 0] == special.pad_id).all()  # placeholders: no new token id
    # initializer_range 0.5: attention that carries the prompt to [MASK] (at 0.02 a random network is
    # almost the identity, and no input steers its prediction)
    config = tiny_text_config(special).model_copy(update={"soft_prompt_tokens": 3, "initializer_range": 0.5})

    def steer(label: str) -> tuple[UniterForPretraining, dict, float]:
        """A fresh model (seed 0) whose soft vectors alone learn to answer `label` for every row."""
        torch.manual_seed(0)
        model = UniterForPretraining(config, task.heads).eval()  # eval: no dropout, gradients still flow
        soft = model.uniter.embeddings.soft_prompt
        for p in model.parameters():
            p.requires_grad_(p is soft)
        one = task.prepare({**batch, "labels": {"emotion": [label] * 8}}, torch.Generator().manual_seed(0))
        optimizer = torch.optim.Adam([soft], lr=0.1)
        for _ in range(30):
            out = task(model, one)
            optimizer.zero_grad()
            out.loss.backward()
            assert soft.grad.abs().sum() > 0
            optimizer.step()
        correct, total = task(model, one).metrics["acc"]
        return model, one, (correct / total).item()

    happy, happy_inputs, happy_acc = steer("a")
    angry, _, angry_acc = steer("b")
    assert happy_acc == angry_acc == 1.0  # the same frozen network answers each label by its vectors
    embeddings = happy.uniter.embeddings
    assert embeddings.word_embeddings.num_embeddings == special.vocab_size == len(tokenizer)
    assert not torch.equal(embeddings.soft_prompt, angry.uniter.embeddings.soft_prompt)
    with torch.no_grad():
        want = task(happy, happy_inputs).loss
        happy.save_pretrained(tmp_path / "m")
        again = UniterForPretraining.from_pretrained(tmp_path / "m").eval()
        assert again.config.soft_prompt_tokens == 3
        assert torch.equal(again.uniter.embeddings.soft_prompt, embeddings.soft_prompt)
        assert torch.equal(task(again, happy_inputs).loss, want)


def test_soft_prompt_pretraining_from_bert_and_the_hf_export(tmp_path, minilm_dir, demo_dbs):
    """A prompt task with soft_prompt: 2 from a BERT checkpoint (which has no such vectors: they start
    fresh), then `--to hf-bert`: the vectors go to soft_prompt.safetensors, transformers loads the rest."""
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM

    from uniter3m.model.export import convert, read_report
    from uniter3m.train.checkpoint import find_resume
    from uniter3m.train.pretrain import run_pretrain

    verbalizer = {"anger": "angry", "joy": "happy", "sadness": "sad", "neutral": "neutral"}
    options = {"soft_prompt": 2, "label_column": "weak_emotion", "verbalizer": verbalizer}
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
        "precision": "fp32",
        "tokenizer": str(minilm_dir),
        "model": {"init": str(minilm_dir)},
        "datasets": {"d": {"txt_db": [str(demo_dbs["txt_train"])]}},
        "tasks": [{"name": "prompt", "dataset": "d", "options": options}],
        "batching": {"max_tokens": 256, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "steps": 2,
        "ckpt_every": 2,
        "val_every": 0,
        "progress": False,
    }
    run_pretrain(cfg)
    model_dir = find_resume(tmp_path / "run", "auto") / "model"
    assert UniterConfig.from_pretrained(model_dir).soft_prompt_tokens == 2
    saved = load_file(str(model_dir / "model.safetensors"))["bert.embeddings.soft_prompt"]
    assert saved.shape == (2, 384)
    convert(model_dir, tmp_path / "hf", target_kind="hf-bert")
    assert torch.equal(load_file(str(tmp_path / "hf" / "soft_prompt.safetensors"))["soft_prompt"], saved)
    assert (
        "soft_prompt.safetensors" in read_report(tmp_path / "hf")["ignored"]["uniter.embeddings.soft_prompt"]
    )
    assert not [k for k in load_file(str(tmp_path / "hf" / "model.safetensors")) if "soft_prompt" in k]
    assert "inputs_embeds" in (tmp_path / "hf" / "README.md").read_text()  # the card says how to use them
    _, info = BertForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"]  # (its pooler is unused by BertForMaskedLM, as for every export)


# ------------------------------------------------------------------------------------------ preset


@pytest.fixture(scope="module")
def demo_dbs(tmp_path_factory, minilm_dir) -> dict:
    """The demo corpus's databases (48 utterances, face 6-d, speech 8-d) and its emotions."""
    from uniter3m.data.synthetic import SyntheticSpec, generate_corpus
    from uniter3m.train.demo import build_corpus_dbs

    root = tmp_path_factory.mktemp("demo")
    spec = SyntheticSpec(
        n_utterances=48, face_dim=6, speech_dim=8, face_frames=(4, 12), speech_frames=(6, 14)
    )
    corpus = generate_corpus(root / "corpus", spec)
    texts = {f"txt_{s}": (corpus.transcripts[s], "weak_emotion") for s in ("train", "valid")}
    return {**build_corpus_dbs(corpus, root / "db", minilm_dir, texts), "emotions": list(corpus.emotions)}


def test_memobert_paper_preset_runs_on_the_demo_corpus(tmp_path, minilm_dir, demo_dbs):
    from uniter3m.train.pretrain import run_pretrain

    cfg = json.loads((REPO / "configs" / "pretrain" / "memobert_paper.json").read_text())
    frames = {"face_db": [str(demo_dbs["face"])], "speech_db": [str(demo_dbs["speech"])]}
    movies = cfg["datasets"]["movies"]
    movies.update(txt_db=[str(demo_dbs["txt_train"])], **frames, max_frames=16)
    movies["valid"] = {"txt_db": [str(demo_dbs["txt_valid"])], **frames}
    for task in cfg["tasks"]:
        if task["name"] == "emo_cls":
            task["options"]["classes"] = demo_dbs["emotions"]
    cfg.update(output_dir=str(tmp_path / "run"), device="cpu", precision="fp32", tokenizer=str(minilm_dir))
    cfg.update(steps=6, val_every=6, ckpt_every=6, val_max_batches=1, grad_accum=1, progress=False)
    cfg["model"] = {
        "config": str(REPO / "configs" / "model" / "tiny.json"),
        "overrides": {"speech_type": "own"},
    }
    cfg["batching"] = {"max_tokens": 512, "num_workers": 0}
    cfg["optim"]["warmup_steps"] = 2
    metrics = run_pretrain(cfg)
    assert {k.split("/")[0] for k in metrics} >= {t["name"] for t in cfg["tasks"]}
    assert all(math.isfinite(v) for v in metrics.values())


def test_itm_rank_queue_is_checkpointed_so_a_resume_is_exact(tmp_path, minilm_dir, demo_dbs):
    """4 steps in one go == 2 steps, a stop, 2 resumed steps: the same queue (it holds every step's
    frames: 64 > 4 batches) and the same weights. An empty queue after the resume would rank the
    text against fewer candidates, so both would differ."""
    from safetensors.torch import load_file

    from uniter3m.train.checkpoint import find_resume, load_trainer_state
    from uniter3m.train.pretrain import run_pretrain

    frames = {"face_db": [str(demo_dbs["face"])], "speech_db": [str(demo_dbs["speech"])]}

    def run(out: str, resume: str | None = None, **top) -> tuple[dict, dict]:
        cfg = {
            "output_dir": str(tmp_path / out),
            "seed": 3,
            "device": "cpu",
            "precision": "fp32",
            "tokenizer": str(minilm_dir),
            "model": {"config": str(REPO / "configs" / "model" / "tiny.json")},
            "datasets": {"d": {"txt_db": [str(demo_dbs["txt_train"])], **frames, "max_frames": 16}},
            "tasks": [{"name": "itm_rank", "dataset": "d", "options": {"negatives": 64}}],
            "batching": {"max_tokens": 256, "num_workers": 0},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "steps": 4,
            "ckpt_every": 2,
            "val_every": 0,
            "progress": False,
        }
        run_pretrain({**cfg, **top}, resume=resume)
        ckpt = find_resume(tmp_path / out, "auto")
        state = load_trainer_state(ckpt)["ranks"][0]["tasks"]
        return state, load_file(str(ckpt / "model" / "model.safetensors"))

    once_state, once_weights = run("once")
    run("split", stop_after=2)
    split_state, split_weights = run("split", resume="auto")
    (key,) = once_state
    bank = once_state[key]["bank"]
    assert bank.shape[0] > 2 * 8 and torch.equal(bank, split_state[key]["bank"])
    assert all(torch.equal(once_weights[k], split_weights[k]) for k in once_weights)


def test_tuple_infonce_scores_each_tuple_against_batch_and_disturbed_tuples(tokenizer, special):
    """8 full tuples of 3 streams: 8 batch candidates + 3 disturbed ones (one per stream); each
    disturbed copy differs from the anchor in exactly its stream."""
    batch = matching_batch(tokenizer, special)
    task = build_task("tuple_contrastive", TaskContext(special, tokenizer))
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    assert inputs["tuple_copies"] == 5 and inputs["tuple_rows"].tolist() == list(range(8))
    face = inputs["face_feat"][:, 0, 0].long().view(5, 8)  # the face frames hold their row's index
    assert torch.equal(face[0], torch.arange(8)) and torch.equal(face[1], torch.arange(8))
    assert (face[3] != torch.arange(8)).all()  # copy 3 disturbs V (order L, V, A)
    assert torch.equal(face[2], torch.arange(8)) and torch.equal(face[4], torch.arange(8))
    text = inputs["input_ids"].view(5, 8, -1)
    assert torch.equal(text[0], text[3]) and not torch.equal(text[0], text[2])  # copy 2 disturbs L
    model = tiny_model(special).eval()
    out = task(model, inputs)
    out.loss.backward()
    value, total = out.metrics["chance"]
    assert (value / total).item() == pytest.approx(1 / 11)
    assert torch.isfinite(out.loss) and out.n_targets.item() == 8
