"""configs/model presets for databases built from recordings: their stream sizes match the extractors'.

One preset per extractor (README "From recordings to databases"): its speech and face dimensions,
and the face stream's per-frame soft-label classes (fer: its 7 expression probabilities). The
dimensions come from the extractor classes, without loading any weights; `whisper-ct2`'s width is
read from the model itself in tests/ingest/test_extractors_speech.py.
"""

from __future__ import annotations

import pytest

from tests.support import REPO
from uniter3m.ingest.extractors.fer import CLASSES, FerExtractor
from uniter3m.ingest.extractors.geometric import GEOMETRIC_DIM
from uniter3m.ingest.extractors.opensmile import COMPARE_DIM, EGEMAPS_DIM, FUNCTIONALS_DIM
from uniter3m.ingest.extractors.resemblyzer import HIDDEN as RESEMBLYZER_DIM
from uniter3m.model.config import UniterConfig

MODELS = REPO / "configs" / "model"
FER = (FerExtractor.dim, len(CLASSES))
NO_SOFT = 0
# preset -> (speech dim, (face dim, face soft-label classes)) of `build-media-db` outputs
PRESETS = {
    "small-rec-compare130-geometric4": (COMPARE_DIM, (GEOMETRIC_DIM, NO_SOFT)),
    "small-rec-egemaps25-geometric4": (EGEMAPS_DIM, (GEOMETRIC_DIM, NO_SOFT)),
    "small-rec-functionals6373-geometric4": (FUNCTIONALS_DIM, (GEOMETRIC_DIM, NO_SOFT)),
    "small-rec-compare130-pixels4096": (COMPARE_DIM, (64 * 64, NO_SOFT)),  # --extractor pixels, 64x64 grey
    "small-rec-compare130-fer256": (COMPARE_DIM, FER),
    "small-rec-compare130-landmarks14": (COMPARE_DIM, (4 + 2 * 5, NO_SOFT)),  # mtcnn, landmarks:5
    "small-rec-compare130-landmarks940": (COMPARE_DIM, (4 + 2 * 468, NO_SOFT)),  # blazeface, landmarks:468
    "small-rec-resemblyzer256-geometric4": (
        RESEMBLYZER_DIM,
        (GEOMETRIC_DIM, NO_SOFT),
    ),  # also resemblyzer-utt
    "small-rec-resemblyzer256-fer256": (RESEMBLYZER_DIM, FER),
    "small-rec-whisper384-geometric4": (384, (GEOMETRIC_DIM, NO_SOFT)),  # Whisper tiny.en's width
    "base-rec-wav2vec768-clip768": (768, (768, NO_SOFT)),  # wav2vec 2.0 base / CLIP ViT-B vision tower
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_dims_match_the_extractors(name):
    config = UniterConfig.from_json(MODELS / f"{name}.json")
    speech, face = PRESETS[name]
    assert (config.speech.feat_dim, (config.face.feat_dim, config.face.soft_label_dim)) == (speech, face)


def test_every_recordings_preset_is_checked():
    assert sorted(p.stem for p in MODELS.glob("*-rec-*.json")) == sorted(PRESETS)
