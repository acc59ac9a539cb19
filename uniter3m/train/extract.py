"""Utterance embeddings of a frozen checkpoint, for linear probes and light heads.

The data is a fine-tuning config's `data` section or a small data-only JSON (`load_data_config`),
read exactly as fine-tuning reads it (the one assembly + Collator), so the features a probe sees are
those the model was tuned on. The output holds one row per utterance of the text db, in the db's
order: `ids`, `embeddings` (N, hidden) float32, one array per label column (`labels/<col>` in h5,
`label_<col>` in npz) and the settings (pool, modalities, checkpoint). The model runs in eval mode
under `no_grad` over batches of similar length in a fixed order, so two runs write the same numbers.

Pooling: `cls` = last hidden state at [CLS] (the collator always puts one first), `mean` = mean
over every real position of the joint sequence (text and frame streams; padding excluded),
`pooler` = the model's tanh pooler over [CLS] (what fine-tuning heads read).

`per_stream` adds one masked-mean vector per stream of the model (text, then its frame streams) and
the count of real positions each utterance has in it (0: absent, its vector is zeros): `streams/<name>`
and `stream_frames/<name>` (npz: `stream_<name>`, `frames_<name>`). `sequence` adds every real
position's last hidden state, ragged: `sequence` (sum of lengths, H), `sequence_offsets` (N + 1; rows
of utterance i are offsets[i]:offsets[i+1], in the joint order text | face | speech),
`sequence_streams` (index into `stream_names`). A `.safetensors` file holds the same arrays under the
h5 names, with ids, text labels and settings in its metadata: a feature cache that
`read_embeddings` (or `safetensors.torch.load_file`) loads without h5py.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniter3m.config import load_config, read_json
from uniter3m.data.collate import Collator
from uniter3m.data.tokenization import SpecialTokens
from uniter3m.errors import ConfigError, DatabaseError, UserError
from uniter3m.fileio import atomic_write_bytes, fsync_dir
from uniter3m.model.pooling import TEXT, masked_mean, stream_parts
from uniter3m.model.uniter import UniterModel
from uniter3m.progress import disabled
from uniter3m.streams import StreamTable
from uniter3m.train.assembly import (
    Databases,
    build_dataset,
    check_vocab_size,
    data_tokenizer,
    tokenizer_record,
)
from uniter3m.train.config import STREAM_TABLE, DataConfig
from uniter3m.train.distributed import pick_device
from uniter3m.train.folds import find_run_config
from uniter3m.train.session import check_vocabulary, read_tokenizer_record

POOLS = ("cls", "mean", "pooler")
FORMATS = (".h5", ".npz", ".safetensors")
#: npz names of the per-stream groups (h5 and safetensors use "<group>/<name>")
NPZ_PREFIX = {"labels": "label", "streams": "stream", "stream_frames": "frames"}
RAGGED = ("sequence", "sequence_offsets", "sequence_streams")


def extract_to_file(
    checkpoint: str | os.PathLike,
    file: str | os.PathLike,
    config: str | os.PathLike | None = None,
    *,
    modalities: str | None = None,
    pool: str = "cls",
    batch_size: int = 64,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = False,
    per_stream: bool = False,
    sequence: bool = False,
) -> dict[str, Any]:
    """`uniter3m extract`: embeddings of the data `config` names (default: the run config beside a
    fine-tuned checkpoint) written to `file` (.h5, .npz or .safetensors); returns what `extract` returns."""
    file = Path(file)
    if file.suffix not in FORMATS:
        raise UserError(f"--file {file}: use a file name ending in {' or '.join(FORMATS)}")
    if file.exists() and not overwrite:
        raise UserError(f"--file {file} exists; pass --overwrite to replace it")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    device = str(pick_device(0, device))  # a GPU that is not there: an error before any reading
    if config is None:
        config = find_run_config(checkpoint)
    data = load_data_config(config, modalities)
    result = extract(
        checkpoint,
        data,
        pool=pool,
        batch_size=batch_size,
        device=device,
        progress=progress,
        per_stream=per_stream,
        sequence=sequence,
    )
    write_embeddings(file, result)
    return result


# ----------------------------------------------------------------------------- config
def load_data_config(path: str | os.PathLike, modalities: str | None = None) -> Any:
    """The `data` section of a fine-tuning config, or a small data-only JSON, validated alike."""
    raw = read_json(path)
    if "data" in raw:
        declared = raw.get("streams")
        raw = dict(raw["data"])
    else:
        declared = raw.pop("streams", None)
    if modalities:
        raw["modalities"] = modalities
    try:
        return load_config(DataConfig, raw, context={STREAM_TABLE: StreamTable.declaring(declared)})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


# ----------------------------------------------------------------------------- extraction
def extract(
    checkpoint: str | os.PathLike,
    data: Any,
    pool: str = "cls",
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = False,
    per_stream: bool = False,
    sequence: bool = False,
) -> dict[str, Any]:
    """Embeddings of every utterance the data config describes; returns ids, embeddings, labels,
    settings and, on request, per-stream vectors and per-position sequences (module docstring)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    if pool not in POOLS:
        raise UserError(f"pool {pool!r}: use one of {', '.join(POOLS)}")
    dev = pick_device(0, device)
    dbs = Databases()
    meta = data_tokenizer(data, dbs)
    special = SpecialTokens.from_dict(meta)
    check_vocabulary(
        read_tokenizer_record(checkpoint), tokenizer_record(meta), str(checkpoint), "the text db"
    )
    dataset = build_dataset(data, dbs)
    model = UniterModel.from_pretrained(checkpoint)
    check_vocab_size(model.config, special, str(checkpoint))
    _check_streams(model.config, dataset, checkpoint)
    model.to(dev).eval()
    # Batches of similar length (little padding), in a fixed order; rows go back to the db's order.
    order = np.argsort(dataset.lengths, kind="stable")
    loader = DataLoader(
        Subset(dataset, order.tolist()),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=Collator(special, stream_table=data.stream_table),
        num_workers=0,
    )
    hidden, n = model.config.hidden_size, len(dataset)
    names = [TEXT, *model.config.frame_streams()]
    embeddings = np.zeros((n, hidden), dtype=np.float32)
    streams = {name: np.zeros((n, hidden), dtype=np.float32) for name in names} if per_stream else {}
    frames = {name: np.zeros(n, dtype=np.int32) for name in names} if per_stream else {}
    positions: list[tuple[np.ndarray, np.ndarray]] = [
        (np.zeros((0, hidden), np.float32), np.zeros(0, np.int8))
    ] * n
    label_rows: list[dict[str, Any]] = [{} for _ in range(len(dataset))]
    start = 0
    with torch.no_grad():
        for batch in tqdm(loader, desc="extract", disable=disabled(progress), unit="batch"):
            out = model(
                input_ids=batch["input_ids"].to(dev),
                attention_mask=batch["txt_mask"].to(dev),
                **{
                    k: batch[k].to(dev)
                    for s in data.stream_table.frame_streams()
                    for k in (s.feat_key, s.mask_key)
                    if k in batch
                },
            )
            rows = order[start : start + len(batch["ids"])]
            start += len(rows)
            embeddings[rows] = pool_output(out, pool).float().cpu().numpy()
            for name, part in zip(names, stream_parts(out, names), strict=True):
                if per_stream and part is not None:
                    streams[name][rows] = masked_mean(*part).float().cpu().numpy()
                    frames[name][rows] = part[1].sum(1).cpu().numpy()
            if sequence:
                states = out.last_hidden_state.float().cpu().numpy()
                mask = out.attention_mask.cpu().numpy()
                which = np.concatenate(
                    [
                        np.full(s.stop - s.start, names.index(name), np.int8)
                        for name, s in out.segments.items()
                    ]
                )
                for i, row in enumerate(rows):
                    positions[row] = (states[i][mask[i]], which[mask[i]])
            for i, row in enumerate(rows):
                if batch["ids"][i] != dataset.ids[row]:  # the loader must follow `order` exactly
                    raise RuntimeError(f"batch id {batch['ids'][i]!r} != dataset id {dataset.ids[row]!r}")
                label_rows[row] = {c: values[i] for c, values in batch["labels"].items()}
    report = dataset.report()
    columns = list(dict.fromkeys(c for row in label_rows for c in row))
    labels = {c: [row.get(c) for row in label_rows] for c in columns}
    result = {
        "ids": list(dataset.ids),
        "embeddings": embeddings,
        "labels": labels,
        "pool": pool,
        "modalities": dataset.modalities,
        "checkpoint": str(checkpoint),
        "dropped": report.dropped,
        "stream_names": names,
    }
    if per_stream:
        result.update(streams=streams, stream_frames=frames)
    if sequence:
        lengths = [len(p[1]) for p in positions]
        result.update(
            sequence=np.concatenate([p[0] for p in positions]).astype(np.float32),
            sequence_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            sequence_streams=np.concatenate([p[1] for p in positions]).astype(np.int8),
        )
    return result


def pool_output(out: Any, pool: str) -> torch.Tensor:
    """(B, H) from a UniterOutput: [CLS] state, masked mean over real positions, or the pooler."""
    if pool == "pooler":
        return out.pooler_output
    if pool == "cls":
        return out.last_hidden_state[:, 0]
    return masked_mean(out.last_hidden_state, out.attention_mask)


def _check_streams(config: Any, dataset: Any, checkpoint: str | os.PathLike) -> None:
    """A frozen checkpoint reads only the streams it was trained with, at their dims."""
    for stream in dataset.streams:
        have, dim = config.stream(stream).feat_dim, dataset.feat_dbs[stream][0].meta["dim"]
        if have != dim:
            what = "has no" if have == 0 else f"expects {have}-d features for its"
            raise DatabaseError(
                f"checkpoint {checkpoint} {what} {stream} stream but {dataset.feat_dbs[stream][0].path} holds "
                f"{dim}-d features; leave {stream} out of the modalities or use the checkpoint trained on this db"
            )


# ----------------------------------------------------------------------------- writing
def _label_array(values: list[Any]) -> np.ndarray:
    """Numbers stay numbers (NaN where absent); anything else becomes text ('' where absent)."""
    if all(v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)) for v in values):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def _arrays(result: Mapping[str, Any]) -> dict[tuple[str, str], np.ndarray]:
    """Every array of a result by (group, name); group "" = top level."""
    arrays = {("", "embeddings"): np.asarray(result["embeddings"], dtype=np.float32)}
    arrays.update({("labels", c): _label_array(v) for c, v in result["labels"].items()})
    for group in ("streams", "stream_frames"):
        arrays.update({(group, name): np.asarray(a) for name, a in (result.get(group) or {}).items()})
    arrays.update({("", k): np.asarray(result[k]) for k in RAGGED if k in result})
    return arrays


def _settings(result: Mapping[str, Any]) -> dict[str, str]:
    return {k: str(result[k]) for k in ("pool", "modalities", "checkpoint")}


def write_embeddings(path: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Write atomically (temp file in the same folder, then rename) as .npz, .h5 or .safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(result)
    names = list(result.get("stream_names") or [])
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        flat = {(f"{NPZ_PREFIX[g]}_{k}" if g else k): a for (g, k), a in arrays.items()}
        extra = {"stream_names": np.array(names, dtype=str)} if names else {}
        settings = {k: np.array(v) for k, v in _settings(result).items()}
        np.savez(buffer, ids=np.array(result["ids"], dtype=str), **flat, **extra, **settings)
        atomic_write_bytes(path, buffer.getvalue())
        return
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        numeric = {(f"{g}/{k}" if g else k): a for (g, k), a in arrays.items() if a.dtype.kind != "U"}
        text = {k: a.tolist() for (g, k), a in arrays.items() if a.dtype.kind == "U"}
        metadata = {
            "ids": json.dumps(list(result["ids"])),
            "text_labels": json.dumps(text),
            "stream_names": json.dumps(names),
            **_settings(result),
        }
        atomic_write_bytes(path, save({k: np.ascontiguousarray(a) for k, a in numeric.items()}, metadata))
        return
    import h5py

    def strings(values: Any) -> list[bytes]:
        return [str(v).encode("utf-8") for v in values]

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ids", data=strings(result["ids"]), dtype=h5py.string_dtype())
            f.require_group("labels")
            for (group, key), arr in arrays.items():
                name = f"{group}/{key}" if group else key
                if arr.dtype.kind == "U":
                    f.create_dataset(name, data=strings(arr), dtype=h5py.string_dtype())
                else:
                    f.create_dataset(name, data=arr)
            if names:
                f.create_dataset("stream_names", data=strings(names), dtype=h5py.string_dtype())
            f.attrs.update(_settings(result))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _nest(flat: Mapping[str, Any], split: Any) -> dict[str, Any]:
    """{file key: array} -> the layout `extract` returns (labels / streams / stream_frames nested)."""
    out: dict[str, Any] = {"labels": {}}
    for key, value in flat.items():
        group, name = split(key)
        if group:
            out.setdefault(group, {})[name] = value
        else:
            out[name] = value
    return out


def read_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by `write_embeddings` back: ids (list[str]), embeddings, labels, settings,
    and the per-stream and sequence arrays when it has them."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file {path} does not exist; write it with `uniter3m extract`")
    if path.suffix == ".npz":
        groups = {v: k for k, v in NPZ_PREFIX.items()}

        def split_npz(key: str) -> tuple[str, str]:
            if key in ("ids", "embeddings", "stream_names", "pool", "modalities", "checkpoint", *RAGGED):
                return "", key
            prefix, _, rest = key.partition("_")
            return (groups[prefix], rest) if prefix in groups and rest else ("", key)

        with np.load(path) as z:
            data = _nest({k: z[k] for k in z.files}, split_npz)
        data["ids"] = [str(i) for i in data["ids"]]
        for k in ("pool", "modalities", "checkpoint"):
            data[k] = str(data[k])
        if "stream_names" in data:
            data["stream_names"] = [str(n) for n in data["stream_names"]]
        return data
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
        data = _nest(load_file(str(path)), lambda k: tuple(k.split("/", 1)) if "/" in k else ("", k))
        data["labels"].update(
            {c: np.array(v, dtype=str) for c, v in json.loads(metadata["text_labels"]).items()}
        )
        data["ids"] = json.loads(metadata["ids"])
        data["stream_names"] = json.loads(metadata["stream_names"])
        data.update({k: metadata[k] for k in ("pool", "modalities", "checkpoint")})
        return data
    import h5py

    with h5py.File(path, "r") as f:
        flat: dict[str, Any] = {}
        f.visititems(
            lambda name, obj: (
                flat.__setitem__(name, obj.asstr()[()] if obj.dtype.kind == "O" else obj[()])
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
        data = _nest(flat, lambda k: tuple(k.split("/", 1)) if "/" in k else ("", k))
        data["ids"] = [str(i) for i in data["ids"]]
        data["labels"] = {
            c: np.array(v, dtype=str) if v.dtype.kind == "O" else v for c, v in data["labels"].items()
        }
        if "stream_names" in data:
            data["stream_names"] = [str(n) for n in data["stream_names"]]
        data.update({k: str(f.attrs[k]) for k in ("pool", "modalities", "checkpoint")})
        return data
