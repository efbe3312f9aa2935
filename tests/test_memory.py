"""Work that would not fit is refused up front, with the estimate in the message."""
from __future__ import annotations

import json

import pytest
import torch

from explorer.calibrate.capture import capture_block_inputs
from explorer.model.loading import load_model
from explorer.model.memory import OutOfMemoryRisk, available_bytes, calibration_bytes
from explorer.model.subnet import ModelShape


def test_huge_model_is_refused_before_loading(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
           "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
           "num_key_value_heads": 8, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OutOfMemoryRisk, match=r"needs about \d+(\.\d)? GiB but only"):
        load_model(str(tmp_path))


def test_calibration_that_cannot_fit_is_refused(tiny):
    shape = ModelShape.from_config(tiny.config)
    n = int(available_bytes() / (2 * 4 * shape.hidden_size * 8)) + 10  # hidden states alone exceed free memory
    assert calibration_bytes(shape, n, 8) > available_bytes()

    class Windows:  # a stand-in with the shape of a huge tensor, so the test allocates nothing
        shape = (n, 8)

        def __len__(self):
            return n

    with pytest.raises(OutOfMemoryRisk, match="calibration on"):
        capture_block_inputs(tiny, Windows(), batch_size=2)
    # a normal setting passes the check and runs
    assert len(capture_block_inputs(tiny, torch.randint(3, 97, (2, 8))).hidden) == 1
