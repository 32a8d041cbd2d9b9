"""Fixtures for the adapt tests: a tiny lmstack model and the same model saved in HF layout.

tiny_model: a fresh llama-family Transformer (see _lora_tiny.make_tiny), eval mode.
tiny_model_dir: that model written by lmstack's save_model (HF layout: config.json + model.safetensors).
"""
from __future__ import annotations

import pytest

from _lora_tiny import make_tiny


@pytest.fixture
def tiny_model():
    return make_tiny()


@pytest.fixture
def tiny_model_dir(tiny_model, tmp_path):
    from lmstack.model.hf_io import save_model

    return save_model(tiny_model, tmp_path / "base")
