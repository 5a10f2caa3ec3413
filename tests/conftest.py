import sys
from pathlib import Path

import numpy as np
import pytest
from factory import make_checkpoint

# generate.py and convert.py are scripts at the repository root: importable by every test file
# (not only after another module that happens to put the root on sys.path is collected)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SLIDING_WINDOW = 8


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Step-3.5 layout, per-layer arrays with num_hidden_layers + 3 entries."""
    return make_checkpoint(tmp_path_factory.mktemp("step3p5"), sliding_window=SLIDING_WINDOW)


@pytest.fixture(scope="session")
def tiny_ckpt_45(tmp_path_factory):
    """Per-layer arrays truncated to num_hidden_layers (the MTP layers follow the i % 4 rule)."""
    return make_checkpoint(
        tmp_path_factory.mktemp("step3p5_45"), variant="step3p5_45", sliding_window=SLIDING_WINDOW
    )


@pytest.fixture(scope="session")
def tiny_ckpt_37(tmp_path_factory):
    """Step-3.7: config under text_config, weights under model.language_model., vision tensors."""
    return make_checkpoint(
        tmp_path_factory.mktemp("step3p7"), variant="step3p7", sliding_window=SLIDING_WINDOW
    )


@pytest.fixture(scope="session")
def tiny_ckpt_nomtp(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("nomtp"), mtp=False, sliding_window=SLIDING_WINDOW, num_shards=2
    )


@pytest.fixture(scope="session")
def tiny_ckpt_rope(tmp_path_factory):
    """Short llama3 original context, so the full layers' frequency scaling moves the logits
    well above tolerance at ~30 positions (with 4096 it changes them by ~1e-4 only)."""
    scaling = {
        "rope_type": "llama3",
        "factor": 2.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return make_checkpoint(
        tmp_path_factory.mktemp("rope"), seed=3, sliding_window=SLIDING_WINDOW, rope_scaling=scaling
    )


@pytest.fixture
def tokens():
    """~3 sliding windows of random token ids, so every sliding cache wraps."""
    return np.random.default_rng(1234).integers(0, 512, size=3 * SLIDING_WINDOW + 6)


@pytest.fixture(scope="session")
def tiny_ckpt_37_flat(tmp_path_factory):
    """Step-3.7 as HF's conversion table lays out the hub files: text weights under model.*."""
    return make_checkpoint(
        tmp_path_factory.mktemp("step3p7_flat"),
        variant="step3p7",
        text_prefix="model.",
        sliding_window=SLIDING_WINDOW,
    )
