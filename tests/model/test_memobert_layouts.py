"""`uniter3m convert --from memobert` against MEmoBERT's own computation (docs/DESIGN.md §5).

The checkpoints are raw state dicts in MEmoBERT's key layout with random values, and
`memobert_forward` recomputes their model in plain torch from that dict alone, following their
published code (uniter3m/model/model.py: text, image and speech embeddings,
`sinusoid_position_encoding`, `_compute_speech_embeddings`; BERT layers of uniter/model/layer.py).
Nothing here comes from uniter3m's model, so a wrong conversion rule shows as different hidden
states. MEmoBERT packs the real positions of each utterance before attention and we pad each
stream instead; attention over the same real keys gives the same values, so real positions are
compared.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from uniter3m.errors import UserError
from uniter3m.model.export import convert_to_ours, read_report
from uniter3m.model.uniter import UniterModel

H, N_HEADS, LAYERS, FF, VOCAB, POSITIONS = 32, 4, 2, 48, 50, 20
FACE_D, SPEECH_D = 12, 10
EPS = 1e-12
U = "uniter."


# ------------------------------------------------------------------ MEmoBERT checkpoints
def memobert_state(*, face: bool, speech: bool, sinusoid: bool, same_type: bool, seed: int = 0) -> dict:
    """A MEmoBERT pretraining state dict (their names, TF-era gamma/beta) with random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def rand(*shape: int, std: float = 0.5) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(prefix: str) -> None:
        sd[prefix + ".gamma"], sd[prefix + ".beta"] = 1 + rand(H, std=0.1), rand(H, std=0.1)

    def linear(prefix: str, n_out: int, n_in: int) -> None:
        sd[prefix + ".weight"], sd[prefix + ".bias"] = rand(n_out, n_in, std=0.2), rand(n_out, std=0.1)

    sd[U + "embeddings.word_embeddings.weight"] = rand(VOCAB, H)
    sd[U + "embeddings.position_embeddings.weight"] = rand(POSITIONS, H)
    sd[U + "embeddings.token_type_embeddings.weight"] = rand(2, H)
    norm(U + "embeddings.LayerNorm")
    streams = []
    if face:
        streams.append(("img_embeddings", "img_linear", "img_layer_norm", FACE_D, False))
    if speech:  # their speech module builds its own type table whenever the types are not shared
        streams.append(("speech_embeddings", "speech_linear", "speech_layer_norm", SPEECH_D, not same_type))
    for module, lin, ln, dim, own_type in streams:
        p = f"{U}{module}."
        linear(p + lin, H, dim)
        norm(p + ln)
        if not sinusoid:  # with use_sinusoid_position_embedding their position_embeddings is None
            sd[p + "position_embeddings.weight"] = rand(POSITIONS, H)
        sd[p + "mask_embedding.weight"] = rand(2, dim)
        if own_type:
            sd[p + "token_type_embeddings.weight"] = rand(1, H)
        norm(p + "LayerNorm")
    for i in range(LAYERS):
        p = f"{U}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            linear(p + "attention.self." + name, H, H)
        linear(p + "attention.output.dense", H, H)
        norm(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", FF, H)
        linear(p + "output.dense", H, FF)
        norm(p + "output.LayerNorm")
    linear(U + "pooler.dense", H, H)
    linear("cls.predictions.transform.dense", H, H)
    norm("cls.predictions.transform.LayerNorm")
    sd["cls.predictions.decoder.weight"] = sd[U + "embeddings.word_embeddings.weight"]
    sd["cls.predictions.bias"] = rand(VOCAB, std=0.1)
    return sd


def memobert_model_config(**layout: bool) -> dict:
    """The model config JSON their runs used (the keys that matter here)."""
    return {
        "hidden_size": H,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": N_HEADS,
        "intermediate_size": FF,
        "hidden_act": "gelu",
        "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2,
        "vocab_size": VOCAB,
        **layout,
    }


# ------------------------------------------------------------------ MEmoBERT's forward, from the dict
def sinusoid_table(num: int, dim: int) -> torch.Tensor:
    """Their `sinusoid_position_encoding`: angle pos / 10000^(2 (j // 2) / dim); sin on even j, cos on odd."""
    pos = torch.arange(num, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(
        torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(j, 2, rounding_mode="floor") / dim
    )
    table = angle.clone()
    table[:, 0::2], table[:, 1::2] = torch.sin(angle[:, 0::2]), torch.cos(angle[:, 1::2])
    return table.float()


def memobert_forward(
    sd: dict, batch: dict, same_type: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden (B, L, H), pooled (B, H), mask (B, L)) of [text | image | speech], as their UniterModel."""

    def ln(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.layer_norm(x, (H,), sd[p + ".gamma"], sd[p + ".beta"], EPS)

    def lin(x: torch.Tensor, p: str) -> torch.Tensor:
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    types = sd[U + "embeddings.token_type_embeddings.weight"]
    ids = batch["input_ids"]
    text = sd[U + "embeddings.word_embeddings.weight"][ids]
    text = text + sd[U + "embeddings.position_embeddings.weight"][: ids.shape[1]] + types[0]
    parts, masks = [ln(text, U + "embeddings.LayerNorm")], [batch["attention_mask"]]
    use_visual = U + "img_embeddings.img_linear.weight" in sd

    def frames(module: str, lin_name: str, ln_name: str, feat, frame_mask, type_vec) -> torch.Tensor:
        p = f"{U}{module}."
        if (
            frame_mask is not None
        ):  # their data zeroes a masked frame; the model adds mask row 1 (row 0 zeroed)
            table = sd[p + "mask_embedding.weight"].clone()
            table[0] = 0
            feat = feat * (~frame_mask)[..., None] + table[frame_mask.long()]
        x = ln(lin(feat, p + lin_name), p + ln_name)
        table_key = p + "position_embeddings.weight"
        positions = sd[table_key][: feat.shape[1]] if table_key in sd else sinusoid_table(feat.shape[1], H)
        return ln(x + positions + type_vec, p + "LayerNorm")

    if "face_feat" in batch:
        parts.append(
            frames(
                "img_embeddings",
                "img_linear",
                "img_layer_norm",
                batch["face_feat"],
                batch.get("face_frame_mask"),
                types[1],
            )
        )
        masks.append(batch["face_mask"])
    if "speech_feat" in batch:
        shared = not use_visual or same_type  # `_compute_speech_embeddings`
        own = sd.get(U + "speech_embeddings.token_type_embeddings.weight")
        speech_type = types[1] if shared else own[0]
        parts.append(
            frames(
                "speech_embeddings",
                "speech_linear",
                "speech_layer_norm",
                batch["speech_feat"],
                None,
                speech_type,
            )
        )
        masks.append(batch["speech_mask"])
    x, mask = torch.cat(parts, 1), torch.cat(masks, 1)
    bias = (1.0 - mask.float())[:, None, None, :] * -10000.0
    dh = H // N_HEADS
    for i in range(LAYERS):
        p = f"{U}encoder.layer.{i}."

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], N_HEADS, dh).transpose(1, 2)

        q, k, v = (heads(lin(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh) + bias, dim=-1)
        context = (probs @ v).transpose(1, 2).reshape(x.shape)
        a = ln(lin(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inner = lin(a, p + "intermediate.dense")
        inner = inner * 0.5 * (1.0 + torch.erf(inner / math.sqrt(2.0)))
        x = ln(lin(inner, p + "output.dense") + a, p + "output.LayerNorm")
    pooled = torch.tanh(lin(x[:, 0], U + "pooler.dense"))
    return x, pooled, mask


def make_batch(face: bool, speech: bool, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    txt_mask = torch.ones(2, 7, dtype=torch.bool)
    txt_mask[1, 5:] = False
    batch = {"input_ids": torch.randint(1, VOCAB, (2, 7), generator=g) * txt_mask, "attention_mask": txt_mask}
    if face:
        face_mask = torch.ones(2, 5, dtype=torch.bool)
        face_mask[0, 3:] = False
        batch |= {
            "face_feat": torch.randn(2, 5, FACE_D, generator=g),
            "face_mask": face_mask,
            "face_frame_mask": torch.tensor(
                [[False, True, False, False, False], [True, False, False, True, False]]
            ),
        }
    if speech:
        speech_mask = torch.ones(2, 6, dtype=torch.bool)
        speech_mask[1, 2:] = False
        batch |= {"speech_feat": torch.randn(2, 6, SPEECH_D, generator=g), "speech_mask": speech_mask}
    return batch


def converted_difference(
    tmp_path, layout: dict, config: dict | None, **convert_options
) -> tuple[float, float]:
    """Max |ours - MEmoBERT| over real positions (hidden states) and over the pooled outputs."""
    sd = memobert_state(**layout)
    torch.save(sd, tmp_path / "model_step_100.pt")
    config_file = None
    if config is not None:
        config_file = tmp_path / "memobert.json"
        config_file.write_text(json.dumps(config))
    out = tmp_path / "ours"
    convert_to_ours("memobert", tmp_path / "model_step_100.pt", out, config_file, **convert_options)
    model = UniterModel.from_pretrained(out).eval()
    batch = make_batch(layout["face"], layout["speech"])
    with torch.no_grad():
        ours = model(**batch)
        want, pooled, mask = memobert_forward(sd, batch, layout["same_type"])
    assert torch.equal(ours.attention_mask, mask)
    hidden = (ours.last_hidden_state[mask] - want[mask]).abs().max().item()
    return hidden, (ours.pooler_output - pooled).abs().max().item()


LAYOUTS = {
    "text+face+speech, learned, own speech type": dict(
        face=True, speech=True, sinusoid=False, same_type=False
    ),
    "text+face+speech, learned, shared type": dict(face=True, speech=True, sinusoid=False, same_type=True),
    "text+face+speech, sinusoid": dict(face=True, speech=True, sinusoid=True, same_type=False),
    "text+speech, own table unused": dict(face=False, speech=True, sinusoid=False, same_type=False),
    "text+speech, sinusoid": dict(face=False, speech=True, sinusoid=True, same_type=False),
    "text+face, sinusoid": dict(face=True, speech=False, sinusoid=True, same_type=False),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_converted_model_computes_what_memobert_computes(tmp_path, name):
    layout = LAYOUTS[name]
    config = memobert_model_config(
        use_sinusoid_position_embedding=layout["sinusoid"], speech_visual_use_same_type=layout["same_type"]
    )
    hidden, pooled = converted_difference(tmp_path, layout, config)
    assert hidden < 1e-5 and pooled < 1e-5, (name, hidden, pooled)
    report = read_report(tmp_path / "ours")
    assert report["new"] == []
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    for stream, present in (("face", layout["face"]), ("speech", layout["speech"])):
        if present:
            assert saved[stream]["position"] == ("sinusoidal" if layout["sinusoid"] else "learned")
    if layout["speech"]:
        own = layout["face"] and not layout["same_type"]
        assert saved["speech_type"] == ("own" if own else "shared")
    if layout["speech"] and not layout["face"]:
        unused = report["ignored"]["uniter.speech_embeddings.token_type_embeddings.weight"]
        assert "shared type row" in unused


def test_sinusoid_is_read_from_the_checkpoint_without_the_config_key(tmp_path):
    """A config that does not mention sinusoids: a stream without a position table has them."""
    layout = LAYOUTS["text+face+speech, sinusoid"]
    hidden, pooled = converted_difference(tmp_path, layout, memobert_model_config())
    assert hidden < 1e-5 and pooled < 1e-5
    assert any("sinusoidal" in note for note in read_report(tmp_path / "ours")["notes"])


def test_a_missing_position_table_is_an_error_unless_allowed(tmp_path):
    """The config says learned positions but the table is absent: refusing beats a random table."""
    layout = dict(face=True, speech=False, sinusoid=True, same_type=False)
    config = memobert_model_config(use_sinusoid_position_embedding=False)
    with pytest.raises(
        UserError, match=r"uniter\.face_embeddings\.position_embeddings\.weight.*\n(.*\n)*.*--allow-new"
    ):
        converted_difference(tmp_path, layout, config)
    assert not (tmp_path / "ours" / "model.safetensors").exists()
    pattern = "uniter.face_embeddings.position_embeddings.*"
    hidden, _ = converted_difference(tmp_path, layout, config, allow_new=[pattern])
    report = read_report(tmp_path / "ours")
    assert report["new"] == ["uniter.face_embeddings.position_embeddings.weight"]
    assert report["allow_new"] == [pattern]
    assert hidden > 0.1  # a fresh table really differs from the sinusoids: why it is refused by default


def test_a_learned_table_contradicting_the_sinusoid_config_is_an_error(tmp_path):
    sd = memobert_state(face=True, speech=False, sinusoid=False, same_type=False)
    torch.save(sd, tmp_path / "model_step_1.pt")
    (tmp_path / "c.json").write_text(json.dumps(memobert_model_config(use_sinusoid_position_embedding=True)))
    with pytest.raises(UserError, match="use_sinusoid_position_embedding.*learned face position table"):
        convert_to_ours("memobert", tmp_path / "model_step_1.pt", tmp_path / "ours", tmp_path / "c.json")
