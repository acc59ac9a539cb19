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
"""

from __future__ import annotations

import io
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
from uniter3m.train.finetune import find_run_config
from uniter3m.train.session import check_vocabulary, read_tokenizer_record

POOLS = ("cls", "mean", "pooler")
FORMATS = (".h5", ".npz")


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
) -> dict[str, Any]:
    """`uniter3m extract`: embeddings of the data `config` names (default: the run config beside a
    fine-tuned checkpoint) written to `file` (.h5 or .npz); returns what `extract` returns."""
    file = Path(file)
    if file.suffix not in FORMATS:
        raise UserError(f"--file {file}: use a file name ending in {' or '.join(FORMATS)}")
    if file.exists() and not overwrite:
        raise UserError(f"--file {file} exists; pass --overwrite to replace it")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if config is None:
        config = find_run_config(checkpoint)
    data = load_data_config(config, modalities)
    result = extract(checkpoint, data, pool=pool, batch_size=batch_size, device=device, progress=progress)
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
) -> dict[str, Any]:
    """Embeddings of every utterance the data config describes; returns ids, embeddings, labels, settings."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    if pool not in POOLS:
        raise UserError(f"pool {pool!r}: use one of {', '.join(POOLS)}")
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
    dev = _device(device)
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
    embeddings = np.zeros((len(dataset), model.config.hidden_size), dtype=np.float32)
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
            for i, row in enumerate(rows):
                if batch["ids"][i] != dataset.ids[row]:  # the loader must follow `order` exactly
                    raise RuntimeError(f"batch id {batch['ids'][i]!r} != dataset id {dataset.ids[row]!r}")
                label_rows[row] = {c: values[i] for c, values in batch["labels"].items()}
    report = dataset.report()
    columns = list(dict.fromkeys(c for row in label_rows for c in row))
    labels = {c: [row.get(c) for row in label_rows] for c in columns}
    return {
        "ids": list(dataset.ids),
        "embeddings": embeddings,
        "labels": labels,
        "pool": pool,
        "modalities": dataset.modalities,
        "checkpoint": str(checkpoint),
        "dropped": report.dropped,
    }


def pool_output(out: Any, pool: str) -> torch.Tensor:
    """(B, H) from a UniterOutput: [CLS] state, masked mean over real positions, or the pooler."""
    if pool == "pooler":
        return out.pooler_output
    if pool == "cls":
        return out.last_hidden_state[:, 0]
    mask = out.attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1.0)


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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r}: {err}") from None


# ----------------------------------------------------------------------------- writing
def _label_array(values: list[Any]) -> np.ndarray:
    """Numbers stay numbers (NaN where absent); anything else becomes text ('' where absent)."""
    if all(v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool)) for v in values):
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def write_embeddings(path: str | os.PathLike, result: Mapping[str, Any]) -> None:
    """Write atomically (temp file in the same folder, then rename) as .npz or .h5."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.array(result["ids"], dtype=str)
    labels = {col: _label_array(values) for col, values in result["labels"].items()}
    settings = {
        "pool": result["pool"],
        "modalities": result["modalities"],
        "checkpoint": result["checkpoint"],
    }
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        arrays = {f"label_{col}": arr for col, arr in labels.items()}
        np.savez(
            buffer,
            ids=ids,
            embeddings=result["embeddings"],
            **arrays,
            **{k: np.array(v) for k, v in settings.items()},
        )
        atomic_write_bytes(path, buffer.getvalue())
        return
    import h5py

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset(
                "ids", data=[i.encode("utf-8") for i in result["ids"]], dtype=h5py.string_dtype()
            )
            f.create_dataset("embeddings", data=result["embeddings"])
            group = f.create_group("labels")
            for col, arr in labels.items():
                if arr.dtype.kind == "U":
                    group.create_dataset(
                        col, data=[v.encode("utf-8") for v in arr], dtype=h5py.string_dtype()
                    )
                else:
                    group.create_dataset(col, data=arr)
            f.attrs.update(settings)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by `write_embeddings` back: ids (list[str]), embeddings, labels, settings."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return {
                "ids": [str(i) for i in z["ids"]],
                "embeddings": z["embeddings"],
                "labels": {k[len("label_") :]: z[k] for k in z.files if k.startswith("label_")},
                **{k: str(z[k]) for k in ("pool", "modalities", "checkpoint")},
            }
    import h5py

    with h5py.File(path, "r") as f:
        labels = {}
        for col, ds in f["labels"].items():
            labels[col] = np.array(ds.asstr()[()], dtype=str) if ds.dtype.kind == "O" else ds[()]
        return {
            "ids": list(f["ids"].asstr()[()]),
            "embeddings": f["embeddings"][()],
            "labels": labels,
            **{k: str(f.attrs[k]) for k in ("pool", "modalities", "checkpoint")},
        }
