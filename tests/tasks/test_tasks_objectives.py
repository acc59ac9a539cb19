"""Every pretraining objective on the tiny model: shapes, over-fitting one batch, gradients, streams."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uniter3m.data.collate import Collator
from uniter3m.errors import ConfigError, UserError
from uniter3m.model.config import UniterConfig
from uniter3m.model.pretraining import UniterForPretraining
from uniter3m.tasks.base import TaskContext, build_task, task_names

FACE_DIM, SPEECH_DIM, FACE_CLASSES = 12, 20, 8
CLASSES = ["anger", "joy", "sadness", "neutral"]
VERBALIZER = {"anger": "angry", "joy": "happy", "sadness": "sad", "neutral": "okay"}
EMOTION_WORDS = {"happy", "angry", "sad", "love", "hate", "terrible", "wonderful"}
UTTERANCES = [
    ("i am so happy to see you again", "joy", 6, 10),
    ("why would you do that to me", "anger", 0, 7),
    ("this is terrible news for all of us", "sadness", 9, 0),
    ("okay", "neutral", 3, 12),
    ("i hate waiting in these unbelievably long lines", "anger", 7, 5),
    ("what a wonderful surprise", "joy", 5, 9),
]
SOFT = np.array(
    [[0.05, 0.85, 0.05, 0.05], [0.6, 0.1, 0.1, 0.2], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]]
    + [[0.3, 0.2, 0.2, 0.3], [0.1, 0.45, 0.05, 0.4]],
    dtype=np.float32,
)

# options each task needs to run on the test batch
OPTIONS = {
    "prompt": {"verbalizer": VERBALIZER, "label_column": "emotion"},
    "prompt_cross": {"verbalizer": VERBALIZER, "label_column": "emotion", "modality_sets": ["VA"]},
    "emo_cls": {"classes": CLASSES, "label_column": "emotion"},
    "face_mrfr": {"span": 3},
    "emotion_itm": {"label_column": "emotion"},
}
USES_POOLER = {"itm", "itm_hard", "emo_cls"}
MASKS_FRAMES = {"face_mrfr": "face", "face_mrc": "face", "speech_mrfr": "speech"}


pytestmark = pytest.mark.usefixtures("one_thread")


def examples(tokenizer, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i, (text, label, n_face, n_speech) in enumerate(UTTERANCES):
        words = text.split()
        enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
        word_ids = enc.word_ids()
        out.append(
            {
                "id": f"utt{i}",
                "input_ids": np.array(enc["input_ids"], dtype=np.int64),
                "word_ids": np.array(word_ids, dtype=np.int64),
                "emo_flags": np.array([words[w] in EMOTION_WORDS for w in word_ids], dtype=bool),
                "labels": {"emotion": label},
                "soft_labels": SOFT[i],
                "face": rng.normal(size=(n_face, FACE_DIM)).astype(np.float32),
                "face_soft": rng.dirichlet(np.ones(FACE_CLASSES), size=n_face).astype(np.float32),
                "speech": rng.normal(size=(n_speech, SPEECH_DIM)).astype(np.float32),
            }
        )
    return out


@pytest.fixture(scope="module")
def batch(tokenizer, special):
    return Collator(special)(examples(tokenizer))


@pytest.fixture(scope="module")
def context(tokenizer, special):
    return TaskContext(special, tokenizer)


def tiny_config(special, **overrides) -> UniterConfig:
    base = {
        "vocab_size": special.vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "face": {"feat_dim": FACE_DIM, "max_frames": 64, "soft_label_dim": FACE_CLASSES},
        "speech": {"feat_dim": SPEECH_DIM, "max_frames": 64, "position": "sinusoidal"},
        "speech_type": "own",
    }
    return UniterConfig.from_dict(base, **overrides)


def model_for(task, special, seed: int = 0, **overrides) -> UniterForPretraining:
    torch.manual_seed(seed)
    return UniterForPretraining(tiny_config(special, **overrides), heads=task.heads, emo_classes=len(CLASSES))


def test_registry_builds_every_task(context):
    expected = {
        "mlm", "wwm", "melm", "melm_wwm", "face_mrfr", "speech_mrfr", "face_mrc", "face_fom", "speech_fom",
        "itm", "itm_hard", "contrastive", "prompt", "prompt_cross", "emo_cls",
    }  # fmt: skip
    assert expected <= set(task_names(context.stream_table))
    for name in expected:
        task = build_task(name, context, **OPTIONS.get(name, {}))
        assert task.name == name
    with pytest.raises(ConfigError, match="unknown task"):
        build_task("mlmx", context)
    with pytest.raises(ConfigError, match="bogus, nope"):
        build_task("mlm", context, bogus=1, nope=2)
    with pytest.raises(ConfigError, match="fixed by the task name"):
        build_task("wwm", context, unit="token")


@pytest.mark.parametrize(
    "name",
    sorted(
        OPTIONS.keys()
        | {
            "mlm",
            "wwm",
            "melm",
            "melm_wwm",
            "speech_mrfr",
            "face_mrc",
            "face_fom",
            "speech_fom",
            "itm",
            "itm_hard",
            "contrastive",
        }
    ),
)
def test_objective_overfits_and_every_used_parameter_learns(name, batch, context, special):
    task = build_task(name, context, **OPTIONS.get(name, {}))
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    model = model_for(task, special)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        out = task.forward(model, inputs)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss)
        assert int(out.n_targets) > 0
        for metric, (num, den) in out.metrics.items():
            # a scalar, or per-class counts (a majority chance level, tasks/chance.py)
            assert num.dim() <= 1 and den.shape == (), metric
        optimiser.zero_grad()
        out.loss.backward()
        if step == 0:
            check_gradients(name, task, model)
        optimiser.step()
        losses.append(out.loss.item())
    assert min(losses[-3:]) < 0.7 * losses[0], f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_gradients(name, task, model) -> None:
    """Every parameter the task uses has a non-zero gradient; the rest are named exceptions."""
    allowed = set()
    if name not in USES_POOLER:
        allowed.add("uniter.pooler.")
    for stream in ("face", "speech"):
        if MASKS_FRAMES.get(name) != stream:
            allowed.add(f"uniter.{stream}_embeddings.mask_embedding")
    dead = [
        pname
        for pname, p in model.named_parameters()
        if p.grad is None or not bool(p.grad.abs().sum() > 0)
        if not any(pname.startswith(a) for a in allowed)
    ]
    assert not dead, f"{name}: no gradient for {dead}"


@pytest.mark.parametrize(
    "name, subsets",
    [
        ("emo_cls", ["L", "V", "A", "LV", "LA", "VA", "LVA"]),
        ("prompt_cross", ["L", "V", "A", "LV", "LA", "VA", "LVA"]),
        ("face_mrfr", ["V", "LV", "VA"]),
        ("speech_mrfr", ["A", "LA"]),
        ("face_fom", ["V"]),
        ("speech_fom", ["A"]),
        ("mlm", ["L", "LV", "LA"]),
        ("itm", ["LV", "LA"]),
        ("contrastive", ["LV", "VA"]),
    ],
)
def test_forward_with_each_modality_subset(name, subsets, batch, context, special):
    for subset in subsets:
        key = "modality_sets"
        options = {**OPTIONS.get(name, {}), key: [subset]}
        task = build_task(name, context, **options)
        inputs = task.prepare(batch, torch.Generator().manual_seed(1))
        assert ("face_feat" in inputs) == ("V" in subset)
        assert ("speech_feat" in inputs) == ("A" in subset)
        if "L" not in subset:  # [CLS] [SEP], or [CLS] prompt [SEP]: the text is gone
            prompt = len(task.prompt_ids) if name.startswith("prompt") else 0
            assert (inputs["attention_mask"].sum(1) == 2 + prompt).all()
        model = model_for(task, special)
        out = task.forward(model, inputs)
        assert torch.isfinite(out.loss), (name, subset)


def test_modality_dropout_draws_every_subset_and_rejects_bad_ones(batch, context):
    task = build_task("mlm", context, modality_sets=[["L", "A"], ["L", "V"], ["L", "V", "A"]])
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        inputs = task.prepare(batch, g)
        seen.add(("face_feat" in inputs, "speech_feat" in inputs))
    assert seen == {(False, True), (True, False), (True, True)}
    with pytest.raises(ConfigError, match="lacks L"):
        build_task("mlm", context, modality_sets=[["V", "A"]])
    with pytest.raises(ConfigError, match="unknown stream"):
        build_task("emo_cls", context, classes=CLASSES, label_column="emotion", modality_sets=[["X"]])


def test_fom_on_noise_stays_at_chance_but_learns_structure(context, special):
    """Fresh noise frames every step: the shuffled frame carries no hint of its origin, so accuracy
    stays near the chance of guessing among the shuffled positions; frames that encode their own
    position are put back in order (so the objective itself works and nothing else leaks)."""
    task = build_task("face_fom", context, shuffle_prob=0.2)
    g = torch.Generator().manual_seed(3)
    length, bsz = 12, 8
    position_codes = torch.randn(length, FACE_DIM, generator=g)

    def run(structured: bool, steps: int) -> tuple[float, float]:
        torch.manual_seed(4)
        net = model_for(task, special, seed=3)
        net.uniter.embeddings.word_embeddings.weight.requires_grad_(False)  # text is [CLS] [SEP]: saves time
        optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
        acc_num = acc_den = chance_num = 0.0
        for step in range(steps):
            feat = torch.randn(bsz, length, FACE_DIM, generator=g)
            if structured:
                feat = position_codes.expand(bsz, -1, -1) + 0.1 * feat
            frames = {
                "ids": [str(i) for i in range(bsz)],
                "input_ids": torch.tensor([[special.cls_id, special.sep_id]] * bsz),
                "txt_mask": torch.ones(bsz, 2, dtype=torch.bool),
                "word_ids": torch.full((bsz, 2), -1),
                "emo_flags": torch.zeros(bsz, 2, dtype=torch.bool),
                "face_feat": feat,
                "face_mask": torch.ones(bsz, length, dtype=torch.bool),
            }
            out = task.forward(net, task.prepare(frames, g))
            optimiser.zero_grad()
            out.loss.backward()
            optimiser.step()
            if step >= steps - 10:
                acc_num += float(out.metrics["acc"][0])
                acc_den += float(out.metrics["acc"][1])
                chance_num += float(out.metrics["chance"][0])
        return acc_num / acc_den, chance_num / acc_den

    noise_acc, chance = run(structured=False, steps=40)
    structured_acc, _ = run(structured=True, steps=40)
    # chance: blind to WHICH slots were shuffled, a guess among the clip's other T - 1 slots is right
    # 1 / (T - 1) = 0.09 of the time. A leak of the original positions would push this towards 1.
    assert noise_acc <= chance + 0.05, (
        f"noise accuracy {noise_acc:.2f} above chance {chance:.2f}: order leaks"
    )
    assert noise_acc < 1 / (length - 1) + 0.1, f"noise accuracy {noise_acc:.2f}: order leaks"
    assert structured_acc > 0.8, f"structured frames reached only {structured_acc:.2f}"


def test_itm_negatives_replace_the_configured_streams(batch, context):
    original = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    task = build_task("itm", context, neg_prob=1.0, negative_streams={"V": 1.0})
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    assert torch.equal(inputs["input_ids"], batch["input_ids"])
    assert torch.equal(inputs["speech_feat"], batch["speech_feat"])
    negatives = inputs["itm_targets"] == 0
    # both utt1 and another face-less utterance would be no negative; only utt1 has no face here
    assert int(negatives.sum()) + int(inputs["itm_fallback"]) == len(batch["ids"])
    for i in torch.nonzero(negatives).flatten().tolist():
        assert not torch.equal(inputs["face_feat"][i], batch["face_feat"][i])
    text = build_task("itm", context, neg_prob=1.0, negative_streams={"L": 1.0}).prepare(
        batch, torch.Generator().manual_seed(1)
    )
    assert torch.equal(text["face_feat"], batch["face_feat"])
    assert (text["itm_targets"] == 0).all()
    assert not torch.equal(text["input_ids"], batch["input_ids"])
    assert all(torch.equal(batch[k], v) for k, v in original.items()), "prepare changed the batch"


def test_matching_without_frames_is_a_clear_error(batch, context, special):
    with pytest.raises(ConfigError, match="no frame stream"):
        build_task("itm", context, modality_sets=[["L"]])
    with pytest.raises(ConfigError, match="contrast needs two"):
        build_task("contrastive", context, modality_sets=[["V"]])
    text_only = {k: v for k, v in batch.items() if not k.startswith(("face", "speech"))}
    with pytest.raises(UserError, match="no frame stream"):
        build_task("itm", context).prepare(text_only, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="needs two streams"):
        build_task("contrastive", context).prepare(text_only, torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="face stream"):
        build_task("face_fom", context).prepare(text_only, torch.Generator().manual_seed(0))


def test_prompt_layout_and_verbalizer_checks(batch, context, tokenizer, special):
    for position in ("before", "after"):
        task = build_task("prompt", context, position=position, **OPTIONS["prompt"])
        inputs = task.prepare(batch, torch.Generator().manual_seed(0))
        targets = inputs["prompt_targets"]
        assert ((targets >= 0).sum(1) == 1).all()
        at = targets >= 0
        assert (inputs["input_ids"][at] == special.mask_id).all()
        words = tokenizer.convert_ids_to_tokens(targets[at].tolist())
        assert words == [VERBALIZER[label] for label in batch["labels"]["emotion"]]
        first = tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0]])
        if position == "before":
            assert first.startswith("[CLS] i am [MASK]. i am so happy")
        else:
            assert first.endswith("again i am [MASK]. [SEP]")
    cross = build_task("prompt_cross", context, modality_sets=["V"], **OPTIONS["prompt"])
    inputs = cross.prepare(batch, torch.Generator().manual_seed(0))
    assert tokenizer.decode(inputs["input_ids"][0][inputs["attention_mask"][0]]) == "[CLS] i am [MASK]. [SEP]"
    with pytest.raises(ConfigError, match="joyful"):
        build_task("prompt", context, verbalizer={"joy": "joyful"}, label_column="emotion")
    with pytest.raises(ConfigError, match="exactly once"):
        build_task("prompt", context, template="i am .", **OPTIONS["prompt"])
    with pytest.raises(UserError, match="'joy'.*utt0"):
        build_task("prompt", context, verbalizer={"anger": "angry"}, label_column="emotion").prepare(
            batch, torch.Generator()
        )
    short = build_task("prompt", context, max_len=9, **OPTIONS["prompt"])
    inputs = short.prepare(batch, torch.Generator())
    assert inputs["input_ids"].shape[1] == 9 and int(inputs["prompt_truncated"]) > 0


def test_emo_cls_soft_labels_quality_filter(batch, context, special):
    task = build_task(
        "emo_cls", context, classes=CLASSES, soft=True, min_confidence={"neutral": 0.8, "*": 0.4}
    )
    inputs = task.prepare(batch, torch.Generator())
    # utt3 is neutral at 0.7 (< 0.8): filtered; utt4 tops at 0.3 (< 0.4): filtered; utt5 joy 0.45 kept
    assert inputs["emo_keep"].tolist() == [True, True, True, False, False, True]
    out = task.forward(model_for(task, special), inputs)
    assert int(out.n_targets) == 4
    assert [float(v) for v in out.metrics["filtered"]] == [2.0, 6.0]
    with pytest.raises(UserError, match="utt0"):
        build_task("emo_cls", context, classes=["anger"], label_column="emotion").prepare(
            batch, torch.Generator()
        )


def test_losses_are_means_over_targets(batch, context, special):
    """Doubling the batch (same rows twice) leaves the loss unchanged and doubles the targets."""
    task = build_task("face_mrfr", context)
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    doubled = {
        k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()
    }
    model = model_for(task, special).eval()
    one, two = task.forward(model, inputs), task.forward(model, doubled)
    assert math.isclose(one.loss.item(), two.loss.item(), rel_tol=1e-5)
    assert int(two.n_targets) == 2 * int(one.n_targets)


@pytest.mark.parametrize("name", ["face_mrfr", "face_fom", "face_mrc"])
def test_empty_face_streams_contribute_no_targets(name, tokenizer, special, context):
    items = examples(tokenizer)[:3]
    for item in items:
        item["face"] = item["face"][:0]
        item["face_soft"] = item["face_soft"][:0]
    empty = Collator(special)(items)
    assert empty["face_feat"].shape[1] == 0
    task = build_task(name, context, **OPTIONS.get(name, {}))
    model = model_for(task, special)
    out = task.forward(model, task.prepare(empty, torch.Generator().manual_seed(0)))
    assert int(out.n_targets) == 0 and out.loss.item() == 0.0
    out.loss.backward()  # still attached to the graph (every rank must run a backward under DDP)


def test_streams_encoded_alone_do_not_see_each_other(batch, context, special):
    """Contrastive embeddings: changing the face frames leaves the text and speech embeddings as they are."""
    from uniter3m.tasks.matching import encode_streams_alone

    task = build_task("contrastive", context)
    inputs = task.prepare(batch, torch.Generator())
    model = model_for(task, special).eval()
    changed = dict(inputs, face_feat=inputs["face_feat"] + 3.0)
    with torch.no_grad():
        a = encode_streams_alone(model, inputs, ["L", "V", "A"], context.stream_table)
        b = encode_streams_alone(model, changed, ["L", "V", "A"], context.stream_table)
    assert torch.allclose(a["L"][0], b["L"][0], atol=1e-6) and torch.allclose(a["A"][0], b["A"][0], atol=1e-6)
    has_face = batch["face_mask"].any(1)
    assert not torch.allclose(a["V"][0][has_face], b["V"][0][has_face])
    assert torch.equal(a["V"][1], has_face)


def mined_negatives(task, model, inputs) -> tuple[torch.Tensor, object]:
    """The face frames itm_hard paired each utterance with, and the task's output."""
    calls = []
    hook = model.uniter.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs), with_kwargs=True
    )
    out = task.forward(model, inputs)
    hook.remove()
    bsz = inputs["input_ids"].shape[0]
    return calls[-1]["face_feat"][bsz:], out  # the ITM pass: B positives, then one negative each


@pytest.mark.parametrize("mining", ["sample", "hardest"])
def test_hard_negatives_skip_duplicates_and_self(tokenizer, special, context, mining):
    items = examples(tokenizer)
    items[1]["face"] = items[0]["face"].copy()  # same clip twice: it must not be mined as a negative
    items[1]["speech"] = items[0]["speech"].copy()
    dup = Collator(special)(items)
    task = build_task("itm_hard", context, mining=mining)
    model = model_for(task, special, hidden_dropout_prob=0.1).train()  # dropout: embeddings of twins differ
    inputs = task.prepare(dup, torch.Generator())
    bsz = len(items)
    for _ in range(10 if mining == "sample" else 1):  # sampling: every draw obeys the rules
        negatives, out = mined_negatives(task, model, inputs)
        assert int(out.n_targets) == 2 * bsz and float(out.metrics["mined"][0]) == bsz
        for i in range(bsz):
            own = inputs["face_feat"][i]
            assert not torch.equal(negatives[i], own), f"utterance {i} was paired with its own frames"
        assert not torch.equal(negatives[0], inputs["face_feat"][1]) and not torch.equal(
            negatives[1], inputs["face_feat"][0]
        )


def test_sampled_hard_negatives_tend_to_the_hardest_as_the_temperature_falls(tokenizer, special, context):
    """mining "sample" draws by softmax(similarity / T): near T = 0 it is the hardest negative, at a
    high T it spreads over the batch (what keeps false negatives from dominating)."""
    batch = Collator(special)(examples(tokenizer))
    hardest = build_task("itm_hard", context, mining="hardest")
    model = model_for(hardest, special).eval()  # no dropout: the similarities are fixed
    inputs = hardest.prepare(batch, torch.Generator())
    target, _ = mined_negatives(hardest, model, inputs)
    cold = build_task("itm_hard", context, mining_temperature=1e-6)
    for _ in range(5):
        assert torch.equal(mined_negatives(cold, model, inputs)[0], target)
    warm = build_task("itm_hard", context, mining_temperature=100.0)
    torch.manual_seed(0)
    draws = {tuple(mined_negatives(warm, model, inputs)[0][0].flatten().tolist()) for _ in range(30)}
    assert len(draws) > 1
    with pytest.raises(ConfigError, match="mining"):
        build_task("itm_hard", context, mining="nearest")


def test_prepare_leaves_the_batch_alone_and_is_deterministic(batch, context):
    original = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    for name in task_names(context.stream_table):
        if name == "speech_mrc":  # the fixture's speech stream has no soft labels
            continue
        task = build_task(name, context, **OPTIONS.get(name, {}))
        a = task.prepare(batch, torch.Generator().manual_seed(5))
        b = task.prepare(batch, torch.Generator().manual_seed(5))
        for key, value in a.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[key]), (name, key)
        for key, value in original.items():
            assert torch.equal(batch[key], value), f"{name}.prepare changed batch[{key!r}]"


def test_frame_targets_are_the_original_frames(batch, context):
    task = build_task("speech_mrfr", context, span=2, replace=[0.4, 0.4, 0.2])
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    targets = inputs["frame_targets"]
    assert torch.equal(inputs["frame_values"], batch["speech_feat"][targets])
    assert not (inputs["speech_frame_mask"] & ~targets).any()
    assert not (targets & ~batch["speech_mask"]).any(), "padding became a target"
    changed = (inputs["speech_feat"] != batch["speech_feat"]).any(-1)
    assert changed.any() and not (changed & ~targets).any()
    soft = build_task("face_mrc", context).prepare(batch, torch.Generator().manual_seed(0))
    expected = batch["face_soft"][soft["frame_targets"]]
    assert torch.allclose(soft["frame_soft"], expected / expected.sum(-1, keepdim=True))
