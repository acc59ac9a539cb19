"""What a fine-tuned model needs to turn NEW recordings into its inputs, recorded at fine-tuning time.

`uniter3m predict` must make the inputs exactly as the training databases were made: the same
extractor with the same options, face detector, frame rate, tokenizer, truncation and
normalisation. Those facts live in the databases' meta.json (written by `build-media-db`, the
corpus builders and `build-txt-db`), which a model folder copied elsewhere no longer reaches; so
`finetune` copies them into `best/finetune.json` under `inputs` (`input_record`). Per frame stream:

* `extractor`: what made the frames (meta `source.extractor`: name, version, frame rate, weights);
* `media`: how to make them again (extractor spec, detector, `ExtractorOptions`, `FaceOptions`),
  None for a database built from feature files (npz/h5/csv/OpenFace): predict cannot remake those;
* `normalisation`: `speaker` ("none", or "recording" for a per-speaker z-scored db: predict z-scores
  each recording's frames by that recording's own statistics, the speaker being unknown), then
  `z_score` with the TRAINING database's `mean`/`std` (`data.normalize`).

With several databases per stream (one per corpus) the first one's are recorded.
"""

from __future__ import annotations

from typing import Any

from uniter3m.data.store import DbReader
from uniter3m.errors import DatabaseError
from uniter3m.train.assembly import Databases
from uniter3m.train.config import FinetuneConfig

INPUTS_KEY = "inputs"  # the key of finetune.json that holds the record
SPEAKER_NORMALISED = "speaker-normalised"  # meta source format of `ingest.normalise.speaker_normalised_db`


def input_record(cfg: FinetuneConfig, dbs: Databases) -> dict[str, Any]:
    """The record for `cfg`'s data (`dbs`: the run's `train.assembly.Databases`)."""
    data = cfg.data
    txt = dbs.get(data.txt_dbs[0], "txt").meta
    streams = {}
    for name, paths in data.feat_dbs.items():
        meta = dbs.get(paths[0], "feat").meta
        source = meta.get("source") or {}
        made_by, speaker = source, "none"
        if source.get("format") == SPEAKER_NORMALISED:
            speaker = "recording"
            try:
                made_by = DbReader(source["path"], kind="feat").meta.get("source") or {}
            except (DatabaseError, KeyError, OSError):
                made_by = {}
        extractor = source.get("extractor") or {}
        streams[name] = {
            "db": paths[0],
            "dim": int(meta["dim"]),
            "extractor": extractor,
            "frame_rate": extractor.get("frame_rate"),
            "media": made_by.get("media"),
            "normalisation": {
                "speaker": speaker,
                "z_score": data.normalize,
                "mean": meta.get("mean"),
                "std": meta.get("std"),
            },
        }
    asr = dict((txt.get("source") or {}).get("asr") or {})
    asr.pop("timestamps", None)
    return {
        "streams_declared": dict(cfg.streams),
        "modalities": data.used_modalities,
        "max_txt_len": data.max_txt_len,
        "max_frames": data.max_frames,
        "normalize": data.normalize,
        "text": {"db": data.txt_dbs[0], "tokenizer": txt.get("tokenizer"), "asr": asr or None},
        "streams": streams,
    }
