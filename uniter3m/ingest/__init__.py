"""Build time: turning files and recordings into databases (sources, media, extractors, detectors, ASR, builders).

Imported by the build recipes, the demo and `predict` (which builds its inputs the way training did); never by
the training loop, the model or the tasks.

- `sources`: feature files (npz, h5, csv, OpenFace) -> `FrameSource` of `Utterance`
- `recordings` (+ `media` decoding, `faces`, `detectors/`, `extractors/`, their `registry` lookup): recordings
  -> `FrameSource`
- `feat_db`, `text_db`: the builders (files, or records given in memory); `merge`, `normalise`: db -> db
- `corpora`, `ravdess`: the shared real corpora -> databases; `asr`: transcripts from recordings
- `align`: face crops aligned by landmarks; `encoders`: local transformers folders (hf:DIR)
See docs/DESIGN.md §2.
"""
