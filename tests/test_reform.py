"""Reformation maths on the tiny random GQA Llama: ADMM reaches the closed form, a reformed layer
never fits worse than the unreformed one (checked on directly recomputed activations), the fitted
intercept is never worse than bias compensation alone, full width changes nothing, the reformed
model is the base model with those weights written in (checked against `explorer.model.reference`),
and cancelling leaves the base model untouched."""
from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_llama
from test_slicing import random_subnet

from explorer.calibrate.capture import capture_block_inputs, run_block
from explorer.calibrate.importance import compute_importance
from explorer.errors import Cancelled
from explorer.events import Progress
from explorer.model.loading import LoadedModel
from explorer.model.reference import weights_match, zeroed_reference
from explorer.model.slicing import layer_indices, slice_model
from explorer.model.subnet import ModelShape, Subnet
from explorer.pick.reform import (
    LayerReform,
    Problem,
    ReformSettings,
    admm,
    attention_gram,
    closed_form,
    mlp_gram,
    reform,
    reformed_digest,
)


def loaded(model) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=None, shape=ModelShape.from_config(model.config), name="tiny",
                       source="tiny random llama", path="", dtype=torch.float32, device="cpu")


@pytest.fixture
def windows():
    torch.manual_seed(0)
    return torch.randint(3, 97, (12, 24))


def first_block_grams(model, subnet, windows):
    """Gram matrices of block 0's o_proj and down_proj, as reformation sees them."""
    shape = ModelShape.from_config(model.config)
    sub = slice_model(model, subnet, shape)
    dense_in = capture_block_inputs(model, windows, 4)
    sub_in = capture_block_inputs(sub, windows, 4)
    idx = layer_indices(shape, subnet.layers[0], "cpu")
    block, sblock = model.model.layers[0], sub.model.layers[0]
    return ({"o": attention_gram(block, sblock, dense_in, sub_in), "down": mlp_gram(block, sblock, sub_in, idx["mlp"])},
            {"o": (block.self_attn.o_proj.weight, idx["q"]), "down": (block.mlp.down_proj.weight, idx["mlp"])})


@torch.no_grad()
@pytest.mark.parametrize("intercept", [False, True])
def test_admm_converges_to_closed_form(tiny, windows, intercept):
    shape = ModelShape.from_config(tiny.config)
    grams, weights = first_block_grams(tiny, random_subnet(shape, 5), windows)
    for name in ("o", "down"):
        w, kept = weights[name]
        gram = grams[name]
        problem = Problem.of(w, None, gram, kept, None, intercept)
        exact = closed_form(problem, 0.01, 1e-4, gram.n)
        s = lambda rho, it: ReformSettings(method="admm", damp=0.01, rho=rho, iterations=it,  # noqa: E731
                                           intercept=intercept)
        gaps = [float((admm(w, None, gram, kept, None, s(1.0, it)) - exact).abs().max()) for it in (10, 30, 300)]
        assert gaps[0] > gaps[1] > gaps[2], gaps
        torch.testing.assert_close(admm(w, None, gram, kept, None, s(0.3, 800)), exact, atol=1e-6, rtol=1e-5)
        # and the closed form is the constrained optimum: no better than it with the same ridge
        assert problem.error(exact) <= problem.error(admm(w, None, gram, kept, None, s(1.0, 30))) * (1 + 1e-6) + 1e-9


def test_reform_with_admm_matches_closed_form(tiny, windows):
    lm = loaded(tiny)
    sub = random_subnet(lm.shape, 2, drop=(2,))
    closed = reform(lm, sub, ReformSettings(batch_size=4), calib_windows=windows).model
    iterated = reform(lm, sub, ReformSettings(method="admm", rho=0.3, iterations=800, batch_size=4),
                      calib_windows=windows).model
    for (k, a), (_, b) in zip(closed.state_dict().items(), iterated.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=k)


def direct_errors(base, reformed, unreformed, subnet: Subnet, windows) -> list[tuple[float, float, float]]:
    """(relative error reformed, unreformed, |rows| check) per projection, from activations recomputed
    here with plain forward hooks (not the Gram matrices reformation used)."""
    shape = ModelShape.from_config(base.config)
    dense_in = capture_block_inputs(base, windows, 4)
    sub_in = capture_block_inputs(reformed, windows, 4)
    hidden = sub_in.hidden
    out = []
    kept_layers = [i for i, l in enumerate(subnet.layers) if l is not None]
    for j, i in enumerate(kept_layers):
        block, sblock = base.model.layers[i], reformed.model.layers[j]
        idx = layer_indices(shape, subnet.layers[i], "cpu")
        seen: dict[str, list] = {"d": [], "s": [], "m": []}
        hooks = [block.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["d"].append(a[0])),
                 sblock.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["s"].append(a[0])),
                 sblock.mlp.register_forward_pre_hook(lambda m, a: seen["m"].append(a[0]))]
        run_block(block, dense_in.with_hidden(hidden))
        next_hidden = run_block(sblock, sub_in.with_hidden(hidden))
        for h in hooks:
            h.remove()
        with torch.no_grad():
            xd = torch.cat([x.flatten(0, 1) for x in seen["d"]]).double()
            xs = torch.cat([x.flatten(0, 1) for x in seen["s"]]).double()
            x = torch.cat([x.flatten(0, 1) for x in seen["m"]])
            a = (block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)).double()
            pairs = [(block.self_attn.o_proj, xd, xs, sblock.self_attn.o_proj, unreformed.model.layers[j].self_attn.o_proj),
                     (block.mlp.down_proj, a, a[:, idx["mlp"]], sblock.mlp.down_proj,
                      unreformed.model.layers[j].mlp.down_proj)]
            out_ = lambda lin, x: x @ lin.weight.double().T + (0 if lin.bias is None else lin.bias.double())  # noqa: E731
            for dense, xd_, xs_, new_lin, old_lin in pairs:
                target = out_(dense, xd_)
                norm = float(target.pow(2).sum())
                new = float((out_(new_lin, xs_) - target).pow(2).sum()) / norm
                old = float((out_(old_lin, xs_) - target).pow(2).sum()) / norm
                out.append((new, old))
        hidden = next_hidden
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reformed_error_never_larger_than_unreformed(seed, windows):
    base = tiny_llama(seed)
    lm = loaded(base)
    sub = random_subnet(lm.shape, seed + 10, drop=(1,) if seed == 1 else ())
    result = reform(lm, sub, ReformSettings(batch_size=4), calib_windows=windows)
    errors = direct_errors(base, result.model, slice_model(base, sub, lm.shape), sub, windows)
    assert len(errors) == len(result.layers)
    for (new, old), rep in zip(errors, result.layers):
        assert new <= old * (1 + 1e-6) + 1e-9, (rep, new, old)
        if rep.applied:  # the reported errors are the recomputed ones
            assert rep.error_after == pytest.approx(new, rel=1e-3, abs=1e-7)
            assert rep.error_before == pytest.approx(old, rel=1e-3, abs=1e-7)
            assert rep.error_after < rep.error_before
    assert any(r.applied and r.error_after < 0.9 * r.error_before for r in result.layers)


@pytest.mark.parametrize("seed", [0, 1])
def test_intercept_is_never_worse_than_compensation_alone(seed, windows):
    """Started from the bias-compensated subnet, every adopted layer lowers the calibration error
    below what compensation alone gives, and the reformed model is exactly the base model with its
    o_proj / down_proj weights and biases written in (independent reference)."""
    base = tiny_llama(seed)
    lm = loaded(base)
    sub = random_subnet(lm.shape, seed + 20, drop=(2,) if seed else ())
    means = compute_importance(base, windows, lm.shape).channel_means()
    result = reform(lm, sub, ReformSettings(batch_size=4), calib_windows=windows, means=means)
    assert result.compensated and result.digest == reformed_digest(result.model)
    assert result.model.config.o_bias and result.model.config.down_bias
    for rep in result.layers:
        assert rep.error_after <= rep.error_before
        assert rep.applied or rep.kept == rep.total
    assert weights_match(base, result.model, sub, lm.shape) == []  # only o_proj / down_proj changed
    ref = zeroed_reference(base, sub, lm.shape, reformed=result.model)
    with torch.no_grad():
        torch.testing.assert_close(result.model(windows).logits, ref(windows).logits, atol=1e-5, rtol=0)
    # the start it must beat is compensation alone: recompute that error directly
    comp = slice_model(base, sub, lm.shape, means)
    for (new, old), rep in zip(direct_errors(base, result.model, comp, sub, windows), result.layers):
        assert new <= old * (1 + 1e-6) + 1e-9, rep


def test_full_width_changes_nothing(tiny, windows):
    lm = loaded(tiny)
    for sub in (Subnet.full(lm.shape), Subnet(tuple(None if i == 1 else l for i, l in enumerate(Subnet.full(lm.shape).layers)))):
        result = reform(lm, sub, ReformSettings(batch_size=4), calib_windows=windows)
        plain = slice_model(tiny, sub, lm.shape)
        assert not any(r.applied for r in result.layers)
        for (k, a), (_, b) in zip(result.model.state_dict().items(), plain.state_dict().items()):
            assert torch.equal(a, b), k
        with torch.no_grad():
            assert torch.equal(result.model(windows[:2]).logits, plain(windows[:2]).logits)


def test_progress_and_cancel_leave_base_untouched(tiny, windows):
    lm = loaded(tiny)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    sub = random_subnet(lm.shape, 7)
    events: list = []
    reform(lm, sub, ReformSettings(batch_size=4), on_event=events.append, calib_windows=windows)
    progress = [e for e in events if isinstance(e, Progress)]
    assert all(e.stage == "reform" for e in progress)
    assert [e.done for e in progress] == list(range(lm.shape.num_layers + 1))
    cancel = threading.Event()

    def stop_after_two(e):
        if isinstance(e, Progress) and e.done == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        reform(lm, sub, ReformSettings(batch_size=4), on_event=stop_after_two, cancel=cancel, calib_windows=windows)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_records_round_trip():
    s = ReformSettings(method="admm", rho=2.0, iterations=5)
    assert ReformSettings.from_dict(s.to_dict()) == s
    assert ReformSettings.demo().windows < ReformSettings().windows == 128
    assert ReformSettings().intercept
    r = LayerReform(3, "mlp.down_proj", 48, 96, 0.5, 0.25, True)
    assert LayerReform.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError):
        ReformSettings(method="newton")
