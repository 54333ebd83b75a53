"""The functional core: purity, vmap over populations, loss features."""

import dataclasses
import math

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map

from helpers import random_weights
from learned_opt import ArchConfig, MetaNetwork, load_weights
from learned_opt.functional import (init_state, lopt_step, observe_validation_loss,
                                    update_training_loss, validation_feature)

SHAPES = [(6, 4), (4,), (), (2, 3, 2)]


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    targets = [torch.randn(s, generator=g) for s in SHAPES]
    return params, targets


def _unroll(w, params, targets, steps, impl="fast"):
    st = init_state(w, params)
    ps = list(params)
    for t in range(steps):
        grads = [2 * (p - q) for p, q in zip(ps, targets)]
        loss = sum(((p - q) ** 2).sum() for p, q in zip(ps, targets))
        ps, st = lopt_step(w, ps, grads, st, loss=loss, impl=impl)
        if t == 2:
            st = observe_validation_loss(st, loss * 1.5)
    return ps, st


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_vmap_over_population_of_weights_and_params_equals_loop(impl):
    pop = 4
    nets = [random_weights(seed=s) for s in range(pop)]
    ws = [{k: v.detach() for k, v in n.weights().items()} for n in nets]
    probs = [_problem(s) for s in range(pop)]
    looped = [_unroll(ws[i], probs[i][0], probs[i][1], 5, impl) for i in range(pop)]

    stack = lambda xs: tree_map(lambda *a: torch.stack(a), *xs)  # noqa: E731
    W = stack(ws)
    P = stack([p for p, _ in probs])
    Q = stack([q for _, q in probs])
    batched = torch.func.vmap(lambda w, p, q: _unroll(w, p, q, 5, impl))(W, P, Q)
    flat_b, _ = tree_flatten(batched)
    for i in range(pop):
        flat_l, _ = tree_flatten(looped[i])
        for b, l in zip(flat_b, flat_l):
            torch.testing.assert_close(b[i], l, rtol=1e-5, atol=1e-6)


def test_step_is_pure():
    w = {k: v.detach() for k, v in random_weights().weights().items()}
    params, targets = _problem(0)
    before = [p.clone() for p in params]
    st = init_state(w, params)
    st_before = tree_map(lambda x: x.clone(), st)
    grads = [p - q for p, q in zip(params, targets)]
    lopt_step(w, params, grads, st, loss=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    for a, b in zip(tree_flatten(st)[0], tree_flatten(st_before)[0]):
        assert torch.equal(a, b)


def _glob(w=None):
    w = w or {k: v.detach() for k, v in MetaNetwork.adam_like().weights().items()}
    return init_state(w, [torch.zeros(3)]).glob


def test_training_loss_feature_matches_formula():
    cfg = ArchConfig()
    g = _glob()
    losses = [3.0, 2.5, 2.7, 1.0]
    mean = var = 0.0
    for i, L in enumerate(losses, 1):
        g, feat = update_training_loss(g, L, cfg)
        mean = 0.9 * mean + 0.1 * L
        var = 0.9 * var + 0.1 * (mean - L) ** 2
        c = 1 / (1 - 0.9 ** i + 1e-8)
        expect = max(-5.0, min(5.0, (L - mean * c) / math.sqrt(var * c + 1e-8)))
        assert float(feat) == pytest.approx(expect, rel=1e-9, abs=1e-9)
    assert float(g.train_count) == 4


def test_loss_features_without_any_loss_are_zero():
    cfg = ArchConfig()
    g = _glob()
    g2, feat = update_training_loss(g, None, cfg)
    assert float(feat) == 0.0 and g2 is g  # statistics untouched
    assert float(validation_feature(g, cfg)) == 0.0
    # validation losses alone (no training loss yet) still give 0
    st = observe_validation_loss(init_state({k: v.detach() for k, v in MetaNetwork.adam_like().weights().items()}, [torch.zeros(2)]), 5.0)
    assert float(validation_feature(st.glob, cfg)) == 0.0


def test_validation_feature_uses_training_statistics():
    cfg = ArchConfig()
    w = {k: v.detach() for k, v in MetaNetwork.adam_like().weights().items()}
    st = init_state(w, [torch.zeros(2)])
    g = st.glob
    for L in (2.0, 1.8, 1.9):
        g, _ = update_training_loss(g, L, cfg)
    st = observe_validation_loss(st._replace(glob=g), 2.2)
    c_t = 1 / (1 - 0.9 ** 3 + 1e-8)
    vmean = 0.05 * 2.2 / (1 - 0.95 + 1e-8)
    expect = (vmean - float(g.train_mean) * c_t) / math.sqrt(float(g.train_var) * c_t + 1e-8)
    assert float(validation_feature(st.glob, cfg)) == pytest.approx(max(-5, min(5, expect)), rel=1e-9)
    assert float(st.glob.step) == 0  # validation losses do not advance the step


def test_nonfinite_losses_are_ignored():
    cfg = ArchConfig()
    g = _glob()
    g, _ = update_training_loss(g, 1.0, cfg)
    for bad in (float("nan"), float("inf")):
        g2, feat = update_training_loss(g, bad, cfg)
        assert float(feat) == 0.0
        assert float(g2.train_count) == 1 and float(g2.train_mean) == float(g.train_mean)
    st = init_state({k: v.detach() for k, v in MetaNetwork.adam_like().weights().items()}, [torch.zeros(2)])
    st2 = observe_validation_loss(st, float("nan"))
    assert float(st2.glob.valid_count) == 0


def test_lr_sequence_length_is_checked():
    w = {k: v.detach() for k, v in MetaNetwork.adam_like().weights().items()}
    params, targets = _problem(0)
    st = init_state(w, params)
    with pytest.raises(ValueError, match="lr has 2 entries"):
        lopt_step(w, params, params, st, lr=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="impl"):
        lopt_step(w, params, params, st, impl="turbo")


def test_weights_of_another_architecture_get_a_clear_error():
    # the default weights carry a config other than ArchConfig(): the functional API needs it
    net, _ = load_weights()
    w = {k: v.detach() for k, v in net.weights().items()}
    p = [torch.randn(3, 2)]
    with pytest.raises(ValueError, match="cfg=net.config"):
        init_state(w, p)
    st = init_state(w, p, net.config)
    with pytest.raises(ValueError, match="cfg=net.config"):
        lopt_step(w, p, [torch.randn(3, 2)], st)
    lopt_step(w, p, [torch.randn(3, 2)], st, cfg=net.config)  # and with it, it runs


def test_a_network_brings_its_own_config():
    # the default weights' architecture (absolute_snr) does not show in the tensors' shapes, so a
    # dict with a wrong cfg of the right widths would run; a MetaNetwork cannot be misread
    net, _ = load_weights()
    w = {k: v.detach() for k, v in net.weights().items()}
    p, g = [torch.randn(3, 2)], [torch.randn(3, 2)]
    want, _ = lopt_step(w, p, g, init_state(w, p, net.config), loss=1.0, cfg=net.config)
    with torch.no_grad():
        got, _ = lopt_step(net, p, g, init_state(net, p), loss=1.0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    wrong = dataclasses.replace(net.config, absolute_snr=False)  # same shapes, other updates
    misread, _ = lopt_step(w, p, g, init_state(w, p, wrong), loss=1.0, cfg=wrong)
    assert not torch.allclose(misread[0], want[0])
    with pytest.raises(ValueError, match="differs from the network's own config"):
        lopt_step(net, p, g, init_state(net, p), cfg=wrong)
