"""Shared fixtures: a tiny random GQA Llama for exact maths, the real embedded model for integration."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_config(**overrides) -> LlamaConfig:
    cfg = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # larger-than-default weights so errors are not hidden by tiny activations
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture(scope="session")
def embedded():
    """The real SmolLM2-135M-Instruct, loaded once per test session."""
    from explorer.model.loading import load_model

    return load_model("default")


# ---- the real app, served once per test session (browser and gradio_client tests) ----------------
from pathlib import Path  # noqa: E402

from bench.app import served_app  # noqa: E402  (the benchmark serves the app the same way)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture
def chromium():
    """Debian's Chromium, headless, through Playwright (never a downloaded browser)."""
    from browser import ARGS, CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed (apt-get install chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """The real app (`python app.py`) on a free port with fresh runs/exports folders."""
    base = tmp_path_factory.mktemp("app")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "SUBNET_EXPLORER_QUICK": "1"}
    with served_app(base, env) as (proc, url):
        yield {"url": url, "base": base, "log": base / "app.log", "proc": proc}
