"""Block-by-block replay reproduces the full forward, and the statistics equal direct sums."""
from __future__ import annotations

import torch

from explorer.calibrate.capture import StatsCollector, block_linears, capture_block_inputs, run_block
from explorer.model.slicing import slice_model
from explorer.model.subnet import ModelShape, Subnet


def test_replay_block_by_block_matches_full_forward(tiny):
    torch.manual_seed(0)
    windows = torch.randint(3, 97, (5, 12))
    for model in (tiny, slice_model(tiny, Subnet.full(ModelShape.from_config(tiny.config)))):
        inputs = capture_block_inputs(model, windows, batch_size=2)
        assert [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
        for block in model.model.layers:
            inputs = inputs.with_hidden(run_block(block, inputs))
        with torch.no_grad():
            want = model.model.norm(torch.cat(inputs.hidden)) @ model.lm_head.weight.T
            torch.testing.assert_close(want, model(windows).logits, atol=1e-5, rtol=0)


def test_stats_equal_direct_computation(tiny):
    torch.manual_seed(1)
    windows = torch.randint(3, 97, (3, 10))
    inputs = capture_block_inputs(tiny, windows, batch_size=2)
    block = tiny.model.layers[0]
    with StatsCollector({"down": block_linears(block)["mlp.down_proj"]}) as col:
        run_block(block, inputs)
    # direct: recompute the down_proj input of every token
    with torch.no_grad():
        h = torch.cat(inputs.hidden)
        a = h + block.self_attn(block.input_layernorm(h), position_embeddings=tiny.model.rotary_emb(
            h, torch.arange(10)[None]), attention_mask=None)[0]
        x = block.mlp.act_fn(block.mlp.gate_proj(block.post_attention_layernorm(a))) * block.mlp.up_proj(
            block.post_attention_layernorm(a))
        x = x.reshape(-1, x.shape[-1])
    s = col.stats["down"]
    assert s.n == 30
    torch.testing.assert_close(s.xtx, x.T @ x, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s.mean, x.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.variance, x.var(0, unbiased=False), atol=1e-5, rtol=1e-4)
