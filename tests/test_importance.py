"""OBS importance equals a direct computation; the initial subnet keeps the top scores at one ratio."""
from __future__ import annotations

import pytest
import torch

from explorer.calibrate.importance import compute_importance
from explorer.model.subnet import ModelShape
from explorer.search.initial import initial_subnet, split_subnet


def _direct_inputs(model, windows):
    """Every linear input of every block, from one ordinary full forward with hooks."""
    got, handles = {}, []
    for i, block in enumerate(model.model.layers):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            def hook(_m, args, key=(i, name)):
                got.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
            handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def _hinv_diag(x, damp=0.01):
    h = 2 * x.T @ x / x.shape[0]
    h = h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.inv(h).diagonal()


def test_scores_match_direct_obs_saliency(tiny):
    shape = ModelShape.from_config(tiny.config)
    torch.manual_seed(0)
    windows = torch.randint(3, 97, (6, 16))
    imp = compute_importance(tiny, windows, shape, batch_size=4)
    xs = _direct_inputs(tiny, windows)
    hd, half, g = shape.head_dim, shape.n_pairs, shape.group_size
    for i, block in enumerate(tiny.model.layers):
        hinv = {n: _hinv_diag(xs[(i, n)]) for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
        W = {n: block.get_submodule(n).weight.detach().double() for n in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        phi = lambda n, h: W[n].pow(2) / h[None, :]  # noqa: E731 - phi_ij = W_ij^2 / [H^-1]_jj
        q, k, v = (phi(n, hinv["self_attn.q_proj"]).sum(1) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
        o = phi("self_attn.o_proj", hinv["self_attn.o_proj"]).sum(0)
        want = torch.zeros(shape.num_kv_heads, half, dtype=torch.float64)
        for kv in range(shape.num_kv_heads):
            for p in range(half):
                for d in (p, p + half):
                    want[kv, p] += k[kv * hd + d] + v[kv * hd + d]
                    for h in range(kv * g, (kv + 1) * g):
                        want[kv, p] += q[h * hd + d] + o[h * hd + d]
        torch.testing.assert_close(imp.attn[i].double(), want, rtol=2e-3, atol=1e-6)
        mlp = (phi("mlp.up_proj", hinv["mlp.gate_proj"]).sum(1) + phi("mlp.gate_proj", hinv["mlp.gate_proj"]).sum(1)
               + phi("mlp.down_proj", hinv["mlp.down_proj"]).sum(0))
        torch.testing.assert_close(imp.mlp[i].double(), mlp, rtol=2e-3, atol=1e-6)
        x = xs[(i, "mlp.down_proj")]
        s = imp.stats[i]["down_in"]
        assert s.n == windows.numel()
        torch.testing.assert_close(s.mean.double(), x.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.variance.double(), x.var(0, unbiased=False), rtol=1e-3, atol=1e-5)


@pytest.fixture
def tiny_imp(tiny):
    shape = ModelShape.from_config(tiny.config)
    torch.manual_seed(1)
    return tiny, shape, compute_importance(tiny, torch.randint(3, 97, (4, 16)), shape)


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5])
def test_initial_subnet_one_ratio_top_scores(tiny_imp, fraction):
    _, shape, imp = tiny_imp
    sub = initial_subnet(imp, shape, fraction, multiple=8, head_multiple=4).validate(shape)
    assert sub.fraction(shape) <= fraction
    widths = {l.width for l in sub.layers}
    dims = {l.head_dim for l in sub.layers}
    assert len(widths) == 1 and len(dims) == 1  # the same keep ratio in every block
    assert widths.pop() % 8 == 0 and dims.pop() % 4 == 0
    for i, layer in enumerate(sub.layers):
        assert set(layer.mlp_channels) == set(imp.mlp[i].topk(layer.width).indices.tolist())
        for kv, pairs in enumerate(layer.attn_pairs):
            assert set(pairs) == set(imp.attn[i][kv].topk(len(pairs)).indices.tolist())


def test_split_subnet_fills_budget(tiny_imp):
    _, shape, imp = tiny_imp
    sub = split_subnet(imp, shape, 0.7, pairs=shape.n_pairs, multiple=8)
    assert sub is not None and 0.68 < sub.fraction(shape) <= 0.7
    assert all(len(l.attn_pairs[0]) == shape.n_pairs for l in sub.layers)
    assert split_subnet(imp, shape, 0.2, pairs=shape.n_pairs) is None  # full attention alone is too big


def test_importance_save_load(tiny_imp, tmp_path):
    from explorer.calibrate.importance import Importance

    _, _, imp = tiny_imp
    imp.save(tmp_path / "imp.pt")
    back = Importance.load(tmp_path / "imp.pt")
    assert all(torch.equal(a, b) for a, b in zip(imp.attn, back.attn))
    assert back.mlp_order == imp.mlp_order
    assert torch.equal(back.stats[2]["o_in"].variance, imp.stats[2]["o_in"].variance)
