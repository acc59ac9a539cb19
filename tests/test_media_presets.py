"""configs/model presets for databases built from recordings: their stream sizes match the extractors'."""

from __future__ import annotations

from pathlib import Path

import pytest

from uniter3m.ingest.extractors.geometric import GEOMETRIC_DIM
from uniter3m.ingest.extractors.opensmile import COMPARE_DIM, EGEMAPS_DIM
from uniter3m.model.config import UniterConfig

MODELS = Path(__file__).resolve().parents[1] / "configs" / "model"
# preset -> (speech dim, face dim) of `build-media-db` outputs (README "From recordings to databases")
PRESETS = {
    "small-rec-compare130-geometric4": (COMPARE_DIM, GEOMETRIC_DIM),
    "small-rec-egemaps25-geometric4": (EGEMAPS_DIM, GEOMETRIC_DIM),
    "small-rec-compare130-pixels4096": (COMPARE_DIM, 64 * 64),  # --extractor pixels, 64x64 grey
    "base-rec-wav2vec768-clip768": (768, 768),  # wav2vec 2.0 base / CLIP ViT-B vision tower hidden size
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_dims_match_the_extractors(name):
    config = UniterConfig.from_json(MODELS / f"{name}.json")
    assert (config.speech.feat_dim, config.face.feat_dim) == PRESETS[name]
    assert config.face.soft_label_dim == 0  # databases from recordings carry no per-frame soft labels
