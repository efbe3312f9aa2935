"""Speed measurement: what it reports and how speed-ups are formed (never how fast anything is)."""
from __future__ import annotations

import statistics

import pytest
import torch
from safetensors.torch import load_file

from explorer.model.latency import SpeedReport, SpeedSettings, measure_speeds, paired_speedup, param_bytes
from explorer.model.slicing import slice_model
from explorer.model.subnet import LayerChoice, ModelShape, Subnet


def report(decode_rounds, prefill_rounds=None) -> SpeedReport:
    prefill_rounds = prefill_rounds or decode_rounds
    return SpeedReport(prefill_ms=0.0, decode_tokens_per_s=0.0, decode_ms_per_token=0.0, param_bytes=0,
                       peak_memory_bytes=0, device="cpu", threads=1, settings={},
                       prefill_ms_rounds=tuple(prefill_rounds), decode_ms_rounds=tuple(decode_rounds))


def test_paired_speedup_is_the_median_of_per_round_ratios():
    base, other = report([10, 40, 30], [8, 8, 8]), report([5, 10, 30], [4, 2, 8])
    # per round 2, 4, 1 -> 2; the ratio of the medians would say 30 / 10 = 3
    assert paired_speedup(base, other) == pytest.approx(2.0)
    assert paired_speedup(base, other, decode=False) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="one measure_speeds call"):
        paired_speedup(base, report([1, 2]))


def half_subnet(shape: ModelShape) -> Subnet:
    half = shape.n_pairs // 2
    return Subnet(tuple(LayerChoice(tuple(tuple(range(half)) for _ in range(shape.num_kv_heads)),
                                    tuple(range(shape.intermediate_size // 2))) for _ in range(shape.num_layers)))


def test_measure_speeds_times_every_model_every_round(tiny):
    shape = ModelShape.from_config(tiny.config)
    small = slice_model(tiny, half_subnet(shape), shape)
    settings = SpeedSettings(prompt_len=8, new_tokens=3, repeats=4, warmup=1)
    out = measure_speeds({"dense": tiny, "half": small}, shape.vocab_size, settings)
    for rep in out.values():
        assert len(rep.decode_ms_rounds) == len(rep.prefill_ms_rounds) == 4
        assert all(t > 0 for t in rep.decode_ms_rounds + rep.prefill_ms_rounds)
        assert rep.decode_ms_per_token == pytest.approx(statistics.median(rep.decode_ms_rounds))
        assert rep.decode_tokens_per_s == pytest.approx(1000 / rep.decode_ms_per_token)
    assert out["dense"].param_bytes == param_bytes(tiny)
    assert out["half"].param_bytes < out["dense"].param_bytes
    assert paired_speedup(out["dense"], out["half"]) > 0


def test_fused_projections_load_from_the_base_layout_and_save_fused(tiny, tmp_path):
    """The slicer writes q/k/v and gate/up separately (the base model's layout); the sliced model
    holds them fused, and that is what an export stores."""
    shape = ModelShape.from_config(tiny.config)
    model = slice_model(tiny, half_subnet(shape), shape)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    half_q = shape.num_heads * shape.head_dim // 2
    base_attn = tiny.model.layers[0].self_attn
    assert torch.equal(attn.qkv_proj.weight[:half_q],
                       base_attn.q_proj.weight.view(shape.num_heads, shape.head_dim, -1)[:, [0, 1, 2, 3, 8, 9, 10, 11]]
                       .reshape(half_q, -1))
    width = shape.intermediate_size // 2
    assert torch.equal(mlp.gate_up_proj.weight[width:], tiny.model.layers[0].mlp.up_proj.weight[:width])
    model.save_pretrained(tmp_path, safe_serialization=True)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) for k in keys)


# ---- the latency model and paired measurements ------------------------------------------------------
def test_fit_keeps_the_fixed_part_and_recovers_exact_costs():
    from explorer.search.latency_model import fit

    true = torch.tensor([9.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    rows = [[1, 30, 2.0, 1.5], [1, 30, 1.0, 0.5], [1, 15, 1.0, 0.75], [1, 8, 0.5, 0.4], [1, 30, 2.0, 0.5],
            [1, 30, 1.0, 1.5]]
    times = (torch.tensor(rows, dtype=torch.float64) @ true).tolist()
    torch.testing.assert_close(fit(rows, times), true)
    # noise that would make a per-block cost negative drops that term, never the fixed part
    noisy = [t + (0.3 if r[1] == 8 else 0.0) for r, t in zip(rows, times)]
    coef = fit(rows, noisy)
    assert coef[0] > 5 and (coef[1:] >= 0).all()


def test_measurements_pair_rounds_and_flag_wide_spreads(tiny, monkeypatch):
    """Speed-ups are per-round ratios; a model whose ratios scatter is timed again with more rounds
    and, if still scattered, marked unreliable (fake clocks: what is checked is the bookkeeping)."""
    import explorer.search.latency_model as lm_mod

    calls = []

    def fake_measure_speeds(models, vocab, settings, **_):
        calls.append(settings.repeats)
        n = settings.repeats
        dense = [10.0] * n
        steady = [5.0] * n
        wild = [5.0 if i % 2 else 1.0 for i in range(n)]
        return {name: report({"dense": dense, "steady": steady, "wild": wild}[name]) for name in models}

    monkeypatch.setattr(lm_mod, "measure_speeds", fake_measure_speeds)
    out = lm_mod.measure(tiny, {"steady": tiny, "wild": tiny}, 97, SpeedSettings(repeats=4), max_spread=0.1, retries=1)
    assert out["steady"].speedup == pytest.approx(2.0) and out["steady"].reliable and out["steady"].rounds == 4
    assert not out["wild"].reliable and out["wild"].rounds == 8 and out["wild"].spread > 0.1
    assert calls == [4, 8]  # only the wild one was timed again, with twice the rounds


def test_timing_rounds_end_at_a_deadline_and_at_stop(tiny):
    """A deadline ends the timed rounds once three are done (and before that refuses to report);
    Stop ends them between runs; progress moves every round."""
    import threading
    import time

    from explorer.errors import Cancelled
    from explorer.model.latency import OutOfTime, measure_speeds

    settings = SpeedSettings(prompt_len=8, new_tokens=2, repeats=50)
    with pytest.raises(OutOfTime, match="0 of 50"):
        measure_speeds({"a": tiny, "b": tiny}, 97, settings, deadline=time.perf_counter())
    deadline = time.perf_counter() + 5.0
    rounds = []

    def on_round(done, total):
        rounds.append((done, total))
        if done == 3:  # the machine stalls here: the deadline passes
            time.sleep(max(0.0, deadline - time.perf_counter()))

    report = measure_speeds({"a": tiny, "b": tiny}, 97, settings, deadline=deadline, on_round=on_round, memory=False)
    assert rounds == [(1, 50), (2, 50), (3, 50)]
    assert len(report["a"].decode_ms_rounds) == len(report["b"].decode_ms_rounds) == 3
    assert report["a"].settings["repeats"] == 3
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        measure_speeds({"a": tiny}, 97, settings, cancel=stop)


def test_real_paired_measurement_of_a_narrower_model(tiny):
    from explorer.search.latency_model import measure

    shape = ModelShape.from_config(tiny.config)
    small = slice_model(tiny, half_subnet(shape), shape)
    m = measure(tiny, {"half": small}, shape.vocab_size, SpeedSettings(prompt_len=8, new_tokens=3, repeats=4))["half"]
    assert m.rounds >= 4 and m.ms > 0 and m.dense_ms > 0 and m.speedup > 0 and m.spread >= 0
    assert set(m.metrics()) == {"measured_ms", "measured_dense_ms", "measured_speedup", "measured_spread",
                                "measured_rounds", "measured_reliable"}
