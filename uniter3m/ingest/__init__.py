"""Build time: turning files and recordings into databases. Never imported by training code.

- `sources`: feature files (npz, h5, csv, OpenFace) -> `FrameSource` of `Utterance`
- `recordings` (+ `media` decoding, `faces`, `detectors/`, `extractors/`): recordings -> `FrameSource`
- `feat_db`, `text_db`: the builders (files, or records given in memory); `merge`, `normalise`: db -> db
- `corpora`: the shared real corpora -> databases; `asr`: transcripts from recordings
See docs/DESIGN.md §2.
"""
