"""Pruning callbacks: exact surgery, selection rule, masks under SGD, schedule validation and checkpoint round trip."""

import math

import pytest
import torch

from callbacks.selection import kept_width, prunable_layers, select_filters, splevel
from callbacks.sparsity import masks_for_tau, normalised_magnitudes, tau_for_sparsity
from callbacks.state import Phase, PruningState, ScheduleError, apply_masks, validate_schedule
from callbacks.surgery import drop_branches, prune_filters
from lightning_modules.ssd import build_ssd, layer_specs

SELECTION = {"conv1_2": [0, 3], "conv3_3": [7], "conv4_3": [1, 2, 5], "conv5_3": [0, 1], "conv6": [3, 9],
             "conv7": [0, 10, 20], "conv8_2": [4], "conv9_1": [2], "conv11_1": [0], "conv11_2": [3]}


def _model(**kw):
    torch.manual_seed(0)
    return build_ssd(300, 4, width_mult=0.125, **kw).eval()


def test_surgery_of_zero_filters_leaves_outputs_unchanged():
    m = _model().double()  # float64: the check is about the surgery, not float32 summation order
    with torch.no_grad():
        for name, idx in SELECTION.items():
            m.layers[name].weight[idx] = 0
            m.layers[name].bias[idx] = 0
    x = torch.randn(2, 3, 300, 300, dtype=torch.float64)
    with torch.no_grad():
        loc0, conf0 = m(x)
    before = m.channels
    prune_filters(m, SELECTION)
    with torch.no_grad():
        loc1, conf1 = m(x)
    assert (loc0 - loc1).abs().max() <= 1e-5 and (conf0 - conf1).abs().max() <= 1e-5
    for name, width in m.channels.items():
        assert width == before[name] - len(SELECTION.get(name, []))
    assert m.l2norm.weight.shape[0] == m.channels["conv4_3"]
    assert m.head.classification_head.module_list[1].in_channels == m.channels["conv7"]
    assert isinstance(m, torch.nn.Module) and not any("mask" in n for n, _ in m.named_buffers())


def test_surgery_refuses_to_remove_every_filter_of_a_layer_and_leaves_the_model_alone():
    m = _model()
    n = m.layers["conv5_1"].out_channels
    widths = dict(m.channels)
    with pytest.raises(ValueError, match=f"cannot remove all {n} filters of conv5_1"):
        prune_filters(m, {"conv6": [0], "conv5_1": list(range(n))})
    assert m.channels == widths
    prune_filters(m, {"conv5_1": list(range(n - 1))})  # one left is a valid (if narrow) layer
    assert m.channels["conv5_1"] == 1


@pytest.mark.parametrize("batch_norm", [False, True])
def test_random_surgery_widths_and_optimizer_state(batch_norm):
    m = _model(batch_norm=batch_norm).train()
    g = torch.Generator().manual_seed(1)
    sel = {n: torch.randperm(c.out_channels, generator=g)[: int(torch.randint(1, c.out_channels // 2 + 1, (1,), generator=g))].tolist()
           for n, c in m.layers.items() if n != "conv1_1"}
    opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(2, 3, 300, 300)
    sum(o.abs().mean() for o in m(x)).backward()
    opt.step()
    w7, buf7 = m.layers["conv7"].weight.detach().clone(), opt.state[m.layers["conv7"].weight]["momentum_buffer"].clone()
    widths = {n: c.out_channels - len(sel.get(n, [])) for n, c in m.layers.items()}
    prune_filters(m, sel, opt)
    assert m.channels == widths
    keep7 = sorted(set(range(w7.shape[0])) - set(sel["conv7"]))
    keep6 = sorted(set(range(w7.shape[1])) - set(sel["conv6"]))
    new7 = m.layers["conv7"].weight
    torch.testing.assert_close(new7, w7[keep7][:, keep6])
    torch.testing.assert_close(opt.state[new7]["momentum_buffer"], buf7[keep7][:, keep6])
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in m.parameters()}
    opt.zero_grad()
    sum(o.abs().mean() for o in m(x)).backward()  # trains a step
    opt.step()


def test_drop_branches():
    m = _model()
    drop_branches(m, 3)
    loc, conf = m(torch.zeros(1, 3, 300, 300))
    assert loc.shape[1] == m.priors.shape[0] == 38 * 38 * 4 + 19 * 19 * 6 + 10 * 10 * 6
    assert "conv9_1" not in m.layers


def test_selection_rule_on_hand_built_weights():
    # layer a: 4 filters over 2 inputs (k=1); layer b: 3 filters over a's 4 channels
    a = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]).view(4, 2, 1, 1)
    b = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0]]).view(3, 4, 1, 1)
    # splevel(F): [0, .5, 1, .5]; splevel(G) (columns of b): [0, 1, 1/3, 1/3]
    assert splevel(a, 0).tolist() == [0.0, 0.5, 1.0, 0.5]
    sel = select_filters({"a": a, "b": b}, ["a"], {"a": "b", "b": None}, s_F=0.9, s_F_min=0.4, s_G=0.9)
    # filter 1: F .5 >= s'_F and G 1 >= s_G -> pruned; filter 2: F 1 >= s_F -> pruned; filter 3: G 1/3 -> kept
    assert sel["a"] == [1, 2]


def test_selection_updates_next_layer_statistics_and_honours_widths():
    a = torch.ones(4, 1, 1, 1)
    a[0] = 0
    b = torch.ones(2, 4, 1, 1)
    b[0, 1:] = 0  # after a's filter 0 is removed, b's filter 0 is fully zero over the surviving inputs
    sel = select_filters({"a": a, "b": b}, ["a", "b"], {"a": "b", "b": None}, s_F=1.0, s_F_min=1.0, s_G=1.0)
    assert sel == {"a": [0], "b": [0]}
    z = torch.zeros(16, 1, 1, 1)
    assert len(select_filters({"z": z}, ["z"], {"z": None}, 0.5, 0.5, 0.5, min_width=4)["z"]) == 12
    z[:3] = 1  # 13 prunable -> keep 3, rounded up to 8
    assert len(select_filters({"z": z}, ["z"], {"z": None}, 0.5, 0.5, 0.5, round_to=8)["z"]) == 8


def test_rounding_up_puts_back_the_least_sparse_of_the_selected_filters():
    """13 of 16 filters are selected (sparsity 0.35-0.95, in shuffled order); keeping 3 rounds up to 8, so the 5
    selected filters with the fewest zeros go back and the 8 sparsest stay selected."""
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    w = torch.ones(16, 20, 1, 1)
    for rank, i in enumerate(perm[:13].tolist()):
        w[i, : 7 + rank] = 0  # the rank-th of the selected has 7 + rank zeros of 20
    sel = select_filters({"z": w}, ["z"], {"z": None}, s_F=0.35, s_F_min=0.35, s_G=1.0, round_to=8)
    assert sel["z"] == sorted(perm[5:13].tolist())


def test_kept_width_never_exceeds_the_layer():
    """A layer narrower than min_width (or than round_to) keeps all it has, never more: the widths a budget prices
    and the surgery builds are real widths."""
    assert kept_width(0, 4, min_width=8) == 4 and kept_width(0, 4, min_width=8, round_to=8) == 4
    assert kept_width(3, 4, min_width=1, round_to=8) == 4 and kept_width(0, 16, min_width=8) == 8
    assert select_filters({"z": torch.zeros(4, 3, 1, 1)}, ["z"], {"z": None}, 0.5, 0.5, 0.5, min_width=8)["z"] == []


def test_improved_global_threshold_is_layer_normalised():
    small = torch.randn(1000) * 1e-3  # a wide layer with small weights
    big = torch.randn(1000)
    norm = normalised_magnitudes({"small": small, "big": big})
    masks = masks_for_tau(norm, tau_for_sparsity(norm, 0.5))
    # a plain global threshold would zero ~all of `small`; the normalised one treats both layers alike
    assert 0.35 < (~masks["small"]).float().mean() < 0.65 and 0.35 < (~masks["big"]).float().mean() < 0.65


def test_masks_hold_zero_under_momentum_and_weight_decay():
    m = _model().train()
    norm = normalised_magnitudes({n: m.layers[n].weight for n in ("conv5_1", "conv6")})
    masks = masks_for_tau(norm, tau_for_sparsity(norm, 0.6))
    opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    apply_masks(m, masks, opt)
    x = torch.randn(1, 3, 300, 300)
    for _ in range(15):
        opt.zero_grad()
        sum(o.abs().mean() for o in m(x)).backward()
        opt.step()
        apply_masks(m, masks, opt)
        for n, mask in masks.items():
            assert (m.layers[n].weight[~mask] == 0).all()
            assert (opt.state[m.layers[n].weight]["momentum_buffer"][~mask] == 0).all()


def test_prunable_layers_share_boundaries():
    p1 = Phase(["conv1_1", "conv1_2", "conv4_3"], (0, 1))
    assert prunable_layers(p1, is_last_phase=False, never_prune=("conv1_1",)) == ["conv1_2"]
    assert prunable_layers(p1, is_last_phase=False) == ["conv1_1", "conv1_2"]
    assert prunable_layers(Phase(["conv8_2", "conv11_2"], (0, 1)), is_last_phase=True) == ["conv8_2", "conv11_2"]


@pytest.mark.parametrize("phases,max_epochs,msg", [
    ([Phase(["conv5_1", "conv99"], (0, 2))], 10, "unknown layer"),
    ([Phase(["conv5_1"], (0, 3)), Phase(["conv6"], (2, 4))], 10, "overlap"),
    ([Phase(["conv5_1"], (0, 3), surgery_epoch=12)], 10, "max_epochs=10"),
    ([Phase(["conv6", "conv5_1"], (0, 3))], 10, "network order"),
    ([Phase(["conv6"], (3, 3))], 10, "l1_epochs"),
])
def test_bad_schedules_fail_clearly(phases, max_epochs, msg):
    with pytest.raises(ValueError, match=msg):
        validate_schedule(phases, [s.name for s in layer_specs(300)], max_epochs)


def test_state_round_trips_through_a_checkpoint(tmp_path):
    st = PruningState([Phase(["conv5_1", "conv6"], (0, 2), 3)])
    st.masks = {"conv6": torch.rand(8, 4, 3, 3) > 0.5}
    st.thresholds = {0: 0.37}
    st.selection = {"conv5_1": [1, 4]}
    st.surgeries = [{"phase": 0, "epoch": 2}]
    st.dense_stats = {"params": 10}
    # what a run killed inside an L1 window needs to go on: the window's start RMS, weights, candidates and Taylor sums
    st.l1_rms = {0: {"conv5_1": 0.5}}
    st.l1_weights = {"conv6": torch.rand(8)}
    st.l1_candidates = {"conv6": torch.rand(8) > 0.5}
    st.taylor = {"conv5_1": torch.rand(4), "conv6": torch.rand(8)}
    st.taylor_steps = 17
    st.lr_restart = {"start": 120, "iters": 300}
    torch.save({"cb": st.state_dict()}, tmp_path / "c.ckpt")
    st2 = PruningState(st.phases)
    st2.load_state_dict(torch.load(tmp_path / "c.ckpt", weights_only=True)["cb"])
    assert torch.equal(st2.masks["conv6"], st.masks["conv6"])
    assert (st2.thresholds, st2.selection, st2.surgeries, st2.dense_stats) == (st.thresholds, st.selection, st.surgeries, st.dense_stats)
    assert (st2.l1_rms, st2.taylor_steps, st2.lr_restart) == (st.l1_rms, st.taylor_steps, st.lr_restart)
    for got, want in ((st2.l1_weights, st.l1_weights), (st2.l1_candidates, st.l1_candidates), (st2.taylor, st.taylor)):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_channels_last_and_bf16_autocast_survive_surgery():
    from lightning_modules.detector import SSDDetector

    det = SSDDetector(["a", "b"], width_mult=0.125, batch_norm=True, channels_last=True, optimizer="adamw")
    det.setup("fit")
    assert det.model.layers["conv5_1"].weight.is_contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(det.model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 3, 300, 300), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.6, 0.7]]), "labels": torch.tensor([1])}] * 2

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loc, conf = det(x)
        loss = det.loss_fn(loc, conf, det.model.priors, targets)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    assert torch.isfinite(step())
    prune_filters(det.model, {"conv5_1": list(range(0, 64, 2)), "conv7": list(range(100))}, opt)
    det.apply_memory_format()
    w = det.model.layers["conv5_1"].weight
    assert w.shape[0] == 32 and w.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(step())


@pytest.mark.parametrize("max_drop,expected", [(0.3, 0.3), (0.6, 0.6), (-1.0, 0.0)])
def test_max_map_drop_finds_the_largest_allowed_sparsity(monkeypatch, max_drop, expected):
    """threshold_mode=max_map_drop: a binary search on validation mAP. With a stand-in mAP that falls by exactly
    the fraction of the phase's weights zeroed, the sparsity found is the largest whose drop <= max_map_drop."""
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction
    from lightning_modules.detector import SSDDetector

    layers = ["conv5_1", "conv5_2", "conv5_3"]
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], threshold_mode="max_map_drop",
                           max_map_drop=max_drop, search_steps=7)
    cb.state.dense_stats = {"measured": "elsewhere"}
    det = SSDDetector(["a", "b"], width_mult=0.125)
    calls = []

    def fake_map(trainer, pl_module):
        w = torch.cat([pl_module.model.layers[n].weight.flatten() for n in layers])
        calls.append(1)
        return 1.0 - float((w == 0).float().mean())

    monkeypatch.setattr(cb, "_eval_map", fake_map)
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), world_size=1, optimizers=[])
    tau = cb.threshold(trainer, det, 0)
    zeroed = float(torch.cat([(~cb.state.masks[n]).flatten() for n in layers]).float().mean())
    assert zeroed == pytest.approx(expected, abs=0.99 / 2**7 + 1e-3)
    assert len(calls) == 1 + 7 and cb.state.thresholds[0] == tau
    for n in layers:  # the weights are zeroed by the masks (and only by them)
        w = det.model.layers[n].weight
        assert torch.equal(w == 0, ~cb.state.masks[n])


def test_proximal_l1_shrinks_by_lr_lambda_and_stops_at_zero():
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction
    from lightning_modules.detector import SSDDetector

    cb = SparsityInduction([{"layers": ["conv5_1"], "l1_epochs": [0, 1]}], l1_lambda=0.5, l1_mode="proximal")
    det = SSDDetector(["a"], width_mult=0.125)
    w = det.model.layers["conv5_1"].weight
    before = w.detach().clone()
    opt = torch.optim.AdamW(det.model.parameters(), lr=0.01)
    trainer = SimpleNamespace(current_epoch=0, optimizers=[opt])
    cb.on_train_batch_end(trainer, det, None, None, 0)
    expected = before.sign() * (before.abs() - 0.005).clamp(min=0)
    assert torch.allclose(w, expected) and (w == 0).sum() == (before.abs() <= 0.005).sum() > 0
    trainer.current_epoch = 1  # outside the window: untouched
    cb.on_train_batch_end(trainer, det, None, None, 0)
    assert torch.allclose(w, expected)


def test_gradient_l1_adds_lambda_times_the_sign_to_the_gradient_in_its_window():
    """Paper A's L1 term (l1_mode "gradient"): inside the phase's window each weight's gradient gains
    lambda * sign(w), so an SGD step shrinks every magnitude; outside it the gradient is left alone."""
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction
    from lightning_modules.detector import SSDDetector

    cb = SparsityInduction([{"layers": ["conv5_1"], "l1_epochs": [0, 1]}], l1_lambda=0.5, l1_mode="gradient")
    det = SSDDetector(["a"], width_mult=0.125)
    w = det.model.layers["conv5_1"].weight
    w.grad = torch.zeros_like(w)
    trainer = SimpleNamespace(current_epoch=0)
    cb.on_before_optimizer_step(trainer, det, None)
    torch.testing.assert_close(w.grad, 0.5 * w.detach().sign())
    before = w.detach().abs().sum()
    torch.optim.SGD([w], lr=1e-3).step()
    assert w.detach().abs().sum() < before
    w.grad = torch.zeros_like(w)
    trainer.current_epoch = 1  # outside the window
    cb.on_before_optimizer_step(trainer, det, None)
    assert not w.grad.any()


def test_l1_below_budget_shrinks_only_the_channels_that_would_go():
    """l1_target below_budget: the lowest-ranked channels (here half of them, by |gamma|) are the candidates; the
    proximal step shrinks their gamma and beta and leaves every other channel exactly as the optimiser left it."""
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction
    from lightning_modules.detector import SSDDetector

    layers = ["conv5_1", "conv5_2", "conv5_3"]
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], l1_lambda=2.0, l1_mode="proximal",
                           sparsity_on="bn_scale", target_sparsity=0.5, l1_target="below_budget")
    torch.manual_seed(0)
    det = SSDDetector(["a"], width_mult=0.125, batch_norm=True)
    norms = det.model.norms
    with torch.no_grad():
        for n in layers:
            norms[n].weight.uniform_(0.1, 1.0)
            norms[n].bias.uniform_(-0.5, 0.5)
    before = {n: (norms[n].weight.detach().clone(), norms[n].bias.detach().clone()) for n in layers}
    opt = torch.optim.AdamW(det.model.parameters(), lr=0.01)
    trainer = SimpleNamespace(current_epoch=0, optimizers=[opt], strategy=SimpleNamespace(broadcast=lambda x, src=0: x))
    cb.state.dense_stats = {"params": 1}  # measured already
    cb.on_train_epoch_start(trainer, det)
    cand = cb.state.l1_candidates
    prunable = prunable_layers(cb.state.phases[0], True, det.model.never_prune)
    assert set(cand) == set(prunable)
    gammas = torch.cat([before[n][0] for n in prunable])
    chosen = torch.cat([cand[n] for n in prunable])
    assert int(chosen.sum()) == round(0.5 * gammas.numel())
    assert gammas[chosen].max() < gammas[~chosen].min()  # the lowest |gamma| are the candidates
    cb.on_train_batch_end(trainer, det, None, None, 0)
    for n in prunable:
        for t, t0 in zip((norms[n].weight, norms[n].bias), before[n]):
            m = cand[n]
            assert torch.equal(t[~m], t0[~m])  # kept channels: untouched
            assert torch.allclose(t[m], t0[m].sign() * (t0[m].abs() - 0.02).clamp(min=0))
    assert cb.state_dict()["l1_candidates"].keys() == cand.keys()  # resumable mid-window
    # re-chosen candidates (the next epoch's): the step acts on the new ones only, not on masks kept from before
    after = {n: (norms[n].weight.detach().clone(), norms[n].bias.detach().clone()) for n in prunable}
    cb.state.l1_candidates = {n: ~m for n, m in cand.items()}
    cb.on_train_batch_end(trainer, det, None, None, 1)
    for n in prunable:
        for t, t1 in zip((norms[n].weight, norms[n].bias), after[n]):
            m = cand[n]
            assert torch.equal(t[m], t1[m])
            assert torch.allclose(t[~m], t1[~m].sign() * (t1[~m].abs() - 0.02).clamp(min=0))


def _channel_fixture(cb, layers, callbacks=()):
    """A BatchNorm SSD whose ``layers`` have distinct random scales in [0.1, 1), and a stand-in trainer at epoch 0
    (one process, ``callbacks`` as the trainer's), for calling ``cb``'s channel scoring directly."""
    from types import SimpleNamespace

    from lightning_modules.detector import SSDDetector

    torch.manual_seed(0)
    det = SSDDetector(["a"], width_mult=0.125, batch_norm=True)
    with torch.no_grad():
        for n in layers:
            det.model.norms[n].weight.uniform_(0.1, 1.0)
    trainer = SimpleNamespace(current_epoch=0, optimizers=[torch.optim.SGD(det.parameters(), lr=0.01)],
                              callbacks=list(callbacks), strategy=SimpleNamespace(broadcast=lambda x, src=0: x))
    cb.state.dense_stats = {"params": 1}
    return det, trainer


def test_candidates_are_exactly_what_the_rounded_surgery_removes():
    """With FilterSelection(min_width, round_to) the masks keep each layer's rounded width, its best-scored channels:
    a channel under tau that the rounding puts back is not faded out (masked, its BatchNorm scale and shift would
    sit at 0 and it would come out of the surgery dead: ReLU(0) has no gradient), and the selection then removes
    exactly the masked channels."""
    from callbacks.selection import FilterSelection
    from callbacks.sparsity import SparsityInduction, tau_for_sparsity
    from callbacks.state import Phase

    layers = ["conv5_1", "conv5_2", "conv5_3"]
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], l1_lambda=2.0, l1_mode="proximal",
                           sparsity_on="bn_scale", target_sparsity=0.55, l1_target="below_budget")
    sel = FilterSelection(s_F=1.0, s_F_min=1.0, s_G=1.0, min_width=8, round_to=8)
    det, trainer = _channel_fixture(cb, layers, callbacks=[cb, sel])
    scores = cb._channel_scores(det, 0)
    tau = tau_for_sparsity(scores, 0.55)
    raw = {n: int((s > tau).sum()) for n, s in scores.items()}  # what tau alone keeps
    assert any(k % 8 for k in raw.values())  # the test needs a layer whose raw count the rounding changes
    masks, _ = cb._channel_masks(trainer, det, 0)
    for n, m in masks.items():
        kept = int(m.sum())
        assert kept % 8 == 0 and raw[n] <= kept < raw[n] + 8, (n, raw[n], kept)
        assert scores[n][m].min() >= scores[n][~m].max() if (~m).any() else True  # the best-scored stay
    phase = Phase(layers=layers, l1_epochs=[0, 1])
    removed = sel.select(det, phase, True, masks)
    assert {n: len(idx) for n, idx in removed.items() if n in masks} == {n: int((~m).sum()) for n, m in masks.items()}
    assert all(set(removed[n]) == set(torch.nonzero(~m).squeeze(1).tolist()) for n, m in masks.items())


def test_target_channels_keeps_the_best_scored_channels_of_each_layer():
    """target_channels: each named layer keeps exactly that many channels, its highest |gamma|; others untouched."""
    from callbacks.sparsity import SparsityInduction

    layers = ["conv5_1", "conv5_2", "conv5_3"]
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], l1_lambda=2.0, l1_mode="proximal",
                           sparsity_on="bn_scale", target_channels={"conv5_1": 8, "conv5_2": 24},
                           l1_target="below_budget")
    det, trainer = _channel_fixture(cb, layers)
    masks, tau = cb._channel_masks(trainer, det, 0)
    assert math.isnan(tau) and {n: int(m.sum()) for n, m in masks.items()} == {"conv5_1": 8, "conv5_2": 24, "conv5_3": 64}
    g = det.model.norms["conv5_1"].weight.detach()
    assert g[masks["conv5_1"]].min() > g[~masks["conv5_1"]].max()
    with pytest.raises(ValueError, match="either target_channels"):
        SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale",
                          target_channels={"conv5_1": 8}, target_params_x=4.0)


def test_g_over_all_consumers_counts_the_head_columns():
    # layer a: 2 filters; the next conv reads channel 0 only through zeros, a head reads it through non-zeros
    a = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]).view(2, 3, 1, 1)  # splevel(F) = [2/3, 0]
    nxt = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).view(2, 2, 1, 1)  # column 0 fully zero
    head = torch.ones(6, 2, 1, 1)  # the head reads both channels
    kw = dict(s_F=0.9, s_F_min=0.5, s_G=0.9)
    assert select_filters({"a": a, "b": nxt}, ["a"], {"a": "b"}, **kw)["a"] == [0]  # G from the next conv: 1.0
    # over all consumers G_0 = 2 zeros of 8 = 0.25 < s_G: kept (paper A's G spans every layer that reads channel 0)
    assert select_filters({"a": a, "b": nxt}, ["a"], {"a": "b"}, extra_consumers={"a": [head]}, **kw)["a"] == []
    head[:, 0] = 0  # a head that ignores channel 0 too: G_0 = 1.0
    assert select_filters({"a": a, "b": nxt}, ["a"], {"a": "b"}, extra_consumers={"a": [head]}, **kw)["a"] == [0]


def test_threshold_norm_before_l1_cuts_a_shrunk_layer_harder():
    torch.manual_seed(0)
    before = {"shrunk": torch.randn(1000), "kept": torch.randn(1000)}
    after = {"shrunk": before["shrunk"] * 0.2, "kept": before["kept"]}  # L1 training shrank one layer as a whole
    scale = {n: float(w.pow(2).mean().sqrt()) for n, w in before.items()}
    now = normalised_magnitudes(after)
    then = normalised_magnitudes(after, scale)
    m_now = masks_for_tau(now, tau_for_sparsity(now, 0.5))
    m_then = masks_for_tau(then, tau_for_sparsity(then, 0.5))
    assert abs((~m_now["shrunk"]).float().mean() - 0.5) < 0.05  # rms now: the shrink is cancelled
    # one tau over both: ~80 % of the shrunk layer and ~20 % of the other go (against 50 / 50 with rms now)
    assert (~m_then["shrunk"]).float().mean() > 0.7 and (~m_then["kept"]).float().mean() < 0.3


def test_surgery_from_l1_weights_keeps_the_unthresholded_filters():
    from callbacks.surgery import StructuredSurgery

    m = _model()
    w = m.layers["conv6"].weight
    theta_l1 = torch.randn_like(w)
    state = PruningState([Phase(["conv5_3", "conv6", "conv7"], (0, 1))], l1_weights={"conv6": theta_l1.clone()})
    with torch.no_grad():
        w.mul_(torch.rand_like(w) > 0.7)  # the thresholded weights
    removed = [1, 4, 5]
    StructuredSurgery.restore_l1_weights(m, ["conv5_3", "conv6", "conv7"], state)
    prune_filters(m, {"conv6": removed})
    keep = [i for i in range(theta_l1.shape[0]) if i not in removed]
    assert torch.equal(m.layers["conv6"].weight, theta_l1[keep]) and state.l1_weights == {}


def test_channel_masks_zero_bn_scale_and_shift_under_adam():
    torch.manual_seed(0)
    m = build_ssd(300, 4, width_mult=0.125, batch_norm=True).train()
    mask = torch.ones(m.layers["conv6"].out_channels, dtype=torch.bool)
    mask[[2, 5]] = False
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        loc, conf = m(torch.randn(2, 3, 300, 300))
        (loc.square().mean() + conf.square().mean()).backward()
        opt.step()
        apply_masks(m, {"conv6": mask}, opt)
    bn = m.norms["conv6"]
    assert (bn.weight[~mask] == 0).all() and (bn.bias[~mask] == 0).all() and (bn.weight[mask] != 0).all()
    assert (opt.state[bn.weight]["exp_avg"][~mask] == 0).all()
    # a masked channel outputs exactly zero after BatchNorm: removing it changes nothing downstream
    m.eval()
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        ref = m(x)
        prune_filters(m, {"conv6": [2, 5]})
        out = m(x)
    for o, r in zip(out, ref):  # equal up to float summation order (a sum of fewer terms)
        torch.testing.assert_close(o, r, atol=1e-5 * float(r.abs().max()), rtol=1e-4)


def test_channel_macs_account_for_every_convolution():
    """Each conv's MACs are counted once per output channel (producing) and once per input channel (reading), so
    sum(width * cost) = 2 x trunk MACs - conv1_1's (its input is the image) + the heads' MACs."""
    from callbacks.budget import channel_macs

    m = build_ssd(300, 4, width_mult=0.125, batch_norm=True)
    macs = {}
    hooks = [c.register_forward_hook(lambda mod, i, o: macs.__setitem__(mod, o[0].numel() * mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]))
             for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    with torch.no_grad():
        m.eval()(torch.zeros(1, 3, 300, 300))
    for h in hooks:
        h.remove()
    trunk = sum(macs[c] for c in m.layers.values())
    heads = sum(v for c, v in macs.items() if c not in set(m.layers.values()))
    cost = channel_macs(m)
    total = sum(cost[n] * m.layers[n].out_channels for n in m.layers)
    assert total == pytest.approx(2 * trunk - macs[m.layers["conv1_1"]] + heads, rel=1e-9)
    assert cost["conv1_2"] > 100 * cost["conv9_2"]  # high resolution costs more per channel


def test_kept_widths_follow_selection_rounding():
    from callbacks.budget import architecture_cost, kept_widths

    m = build_ssd(300, 4, width_mult=0.125, batch_norm=True)
    w = kept_widths(m, {"conv6": torch.arange(128) < 50, "conv7": torch.zeros(128, dtype=torch.bool)}, 8, 8)
    assert w["conv6"] == 56 and w["conv7"] == 8 and w["conv5_3"] == m.channels["conv5_3"]
    small = build_ssd(300, 4, w, batch_norm=True)
    assert architecture_cost(m, w, "params") == sum(p.numel() for p in small.parameters())


def test_consumer_weight_sees_every_reader():
    from callbacks.budget import consumer_weight

    m = build_ssd(300, 4, width_mult=0.125, batch_norm=True)
    with torch.no_grad():
        m.layers["conv8_1"].weight[:, 3] = 0  # the next conv ignores conv7's channel 3 ...
    w = consumer_weight(m, "conv7")
    assert 0.4 < w[3] < 0.9  # ... but conv7 is a source: its heads still read it
    with torch.no_grad():
        for head in (m.head.classification_head, m.head.regression_head):
            head.module_list[1].weight[:, 3] = 0
    assert consumer_weight(m, "conv7")[3] == 0 and consumer_weight(m, "conv7").mean() == pytest.approx(1.0, abs=0.01)


def test_max_map_drop_search_on_channels():
    """The same binary search with channel masks (sparsity_on=bn_scale): the stand-in mAP falls by the fraction of
    BatchNorm channels zeroed; the search ends within one step of the allowed drop and restores every scale it tried."""
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction
    from lightning_modules.detector import SSDDetector

    layers = ["conv5_1", "conv5_2", "conv5_3", "conv6"]
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], threshold_mode="max_map_drop", max_map_drop=0.3,
                           search_steps=7, sparsity_on="bn_scale")
    cb.state.dense_stats = {"measured": "elsewhere"}
    torch.manual_seed(0)
    det = SSDDetector(["a", "b"], width_mult=0.125, batch_norm=True)
    with torch.no_grad():
        for n in layers:
            det.model.norms[n].weight.uniform_(0.1, 1.0)
    prunable = layers  # the only phase is the last one: all its layers may lose filters
    cb.state.phases[0].layers = layers

    def fake_map(trainer, pl_module):
        g = torch.cat([pl_module.model.norms[n].weight for n in prunable])
        return 1.0 - float((g == 0).float().mean())

    cb._eval_map = fake_map
    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj), world_size=1, optimizers=[],
                              callbacks=[])
    cb.threshold(trainer, det, 0)
    zeroed = float(torch.cat([(~cb.state.masks[n]) for n in prunable]).float().mean())
    assert zeroed == pytest.approx(0.3, abs=0.99 / 2**7 + 1e-2)
    for n in prunable:  # the masks, and only they, zero gamma and beta
        bn = det.model.norms[n]
        assert torch.equal(bn.weight == 0, ~cb.state.masks[n]) and (bn.bias[~cb.state.masks[n]] == 0).all()


def test_taylor_score_is_the_mean_squared_first_order_gate_term_of_the_last_epoch():
    """channel_score taylor: (gamma dL/dgamma + beta dL/dbeta) ** 2 summed over the raw gradients of each step,
    averaged over the last epoch's steps, read when the L1 window chooses its candidates; then reset."""
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction
    from lightning_modules.detector import SSDDetector

    layers = ["conv5_1", "conv5_2", "conv5_3"]
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [1, 2]}], l1_lambda=2.0, l1_mode="proximal",
                           sparsity_on="bn_scale", target_sparsity=0.5, l1_target="below_budget",
                           channel_score="taylor")
    torch.manual_seed(0)
    det = SSDDetector(["a"], width_mult=0.125, batch_norm=True)
    norms = det.model.norms
    opt = torch.optim.SGD(det.model.parameters(), lr=0.0)
    trainer = SimpleNamespace(current_epoch=0, optimizers=[opt], strategy=SimpleNamespace(broadcast=lambda x, src=0: x))
    expected = {n: torch.zeros_like(norms[n].weight) for n in layers}
    for step in range(3):
        opt.zero_grad()
        det.model(torch.randn(2, 3, 300, 300))[0].pow(2).mean().mul(step + 1).backward()
        for n in layers:
            bn = norms[n]
            expected[n] += (bn.weight.grad * bn.weight + bn.bias.grad * bn.bias).detach().pow(2)
        cb.on_before_optimizer_step(trainer, det, opt)
    prunable = prunable_layers(cb.state.phases[0], True, det.model.never_prune)
    scores = cb._channel_scores(det, 0)
    for n in prunable:
        assert torch.allclose(scores[n], expected[n] / 3)
    assert cb.state_dict()["taylor_steps"] == 3  # resumable: the epoch's sums are in the checkpoint
    trainer.current_epoch = 2  # sums no epoch reads (the last L1 epoch's: the cut takes its candidates) are not made
    cb.on_before_optimizer_step(trainer, det, opt)
    assert cb.state.taylor_steps == 3
    trainer.current_epoch = 0
    trainer.current_epoch = 1
    cb.state.dense_stats = {"params": 1}
    cb.on_train_epoch_start(trainer, det)
    chosen = torch.cat([cb.state.l1_candidates[n] for n in prunable])
    flat = torch.cat([expected[n] for n in prunable])
    assert flat[chosen].max() <= flat[~chosen].min()  # the smallest estimated loss changes are the candidates
    assert cb.state.taylor == {} and cb.state.taylor_steps == 0
    with pytest.raises(ScheduleError, match="no gradients"):
        cb._channel_scores(det, 0)
    with pytest.raises(ValueError, match="needs sparsity_on: bn_scale"):
        SparsityInduction([{"layers": layers, "l1_epochs": [1, 2]}], channel_score="taylor")


def test_per_step_taylor_sums_and_proximal_step_launch_a_few_operations_whatever_the_layer_count():
    """The two things SparsityInduction does at every training step, the Taylor sums and the proximal L1 step, are a
    few multi-tensor operations over all 23 layers (on a GPU each operation is a kernel launch, and one per layer and
    term cost ~165 per step: benchmarks/README.md, "kernel launches per step")."""
    from types import SimpleNamespace

    from benchmarks.bench_syncs import LaunchProbe
    from callbacks.sparsity import SparsityInduction
    from lightning_modules.detector import SSDDetector

    torch.manual_seed(0)
    det = SSDDetector(["a"], width_mult=0.125, batch_norm=True)
    layers = list(det.model.norms)
    assert len(layers) >= 20
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [1, 3]}], l1_lambda=2.0, l1_mode="proximal",
                           sparsity_on="bn_scale", target_sparsity=0.5, l1_target="below_budget",
                           channel_score="taylor")
    opt = torch.optim.AdamW(det.model.parameters(), lr=0.01)
    trainer = SimpleNamespace(current_epoch=0, optimizers=[opt], strategy=SimpleNamespace(broadcast=lambda x, src=0: x))
    det.model(torch.randn(2, 3, 300, 300))[0].pow(2).mean().backward()
    probe = LaunchProbe()
    with probe:
        probe.active = True
        cb.on_before_optimizer_step(trainer, det, opt)  # epoch 0: its sums choose epoch 1's candidates
        cb.on_before_optimizer_step(trainer, det, opt)
    assert cb.state.taylor_steps == 2 and set(cb.state.taylor) == set(layers)
    assert 0 < sum(probe.where.values()) <= 2 * 6
    trainer.current_epoch = 1
    cb.state.dense_stats = {"params": 1}
    cb.on_train_epoch_start(trainer, det)
    cb.on_train_batch_end(trainer, det, None, None, 0)  # the first step makes the entry masks once
    probe.where.clear()
    with probe:
        probe.active = True
        cb.on_train_batch_end(trainer, det, None, None, 1)
    assert 0 < sum(probe.where.values()) <= 8


def test_taylor_gamma_g_is_the_geometric_mean_of_both_layer_relative_scores():
    """channel_score taylor_gamma_g: sqrt(rel(sqrt(taylor)) * rel(|gamma| x G)), rel = relative to the layer's mean;
    a channel the loss does not need but its consumers read strongly ranks between the two criteria."""
    from callbacks.budget import consumer_weight
    from callbacks.sparsity import SparsityInduction

    layers = ["conv5_1", "conv5_2", "conv5_3"]
    kw = dict(l1_lambda=2.0, l1_mode="proximal", sparsity_on="bn_scale", target_sparsity=0.5, l1_target="below_budget")
    mixed = SparsityInduction([{"layers": layers, "l1_epochs": [1, 2]}], channel_score="taylor_gamma_g", **kw)
    taylor = SparsityInduction([{"layers": layers, "l1_epochs": [1, 2]}], channel_score="taylor", **kw)
    det, trainer = _channel_fixture(mixed, layers)
    opt = trainer.optimizers[0]  # never stepped: only the gradients are read
    for step in range(2):
        opt.zero_grad()
        det.model(torch.randn(2, 3, 300, 300))[0].pow(2).mean().backward()
        mixed.on_before_optimizer_step(trainer, det, opt)
        taylor.on_before_optimizer_step(trainer, det, opt)
    got, t = mixed._channel_scores(det, 0), taylor._channel_scores(det, 0)
    assert set(got) == set(t) and got
    for n in got:
        rt = t[n].sqrt() / t[n].sqrt().mean()
        gg = det.model.norms[n].weight.abs() * consumer_weight(det.model, n)
        assert torch.allclose(got[n], (rt * gg / gg.mean()).sqrt(), rtol=1e-5)
        assert not torch.equal(got[n].argsort(), t[n].argsort())  # a different ranking from the Taylor score alone
    with pytest.raises(ValueError, match="taylor_gamma_g scores BatchNorm gates"):
        SparsityInduction([{"layers": layers, "l1_epochs": [1, 2]}], channel_score="taylor_gamma_g")


def test_class_balanced_taylor_differentiates_the_class_weighted_loss_in_the_epochs_it_is_read():
    """taylor_loss class_balanced: before the training backward, the gradients of the module's class-balanced loss
    (each class weighted n / (K n_c) by its running label count) w.r.t. the BatchNorm gates go into the Taylor sums;
    the training gradients stay untouched; epochs whose scores nobody reads cost no extra pass; and a module without
    the loss or a non-Taylor score is refused with a message."""
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction
    from lightning_modules.box_ops import MultiBoxLoss
    from lightning_modules.detector import SSDDetector

    layers = ["conv5_1", "conv5_2", "conv5_3"]
    kw = dict(l1_lambda=2.0, l1_mode="proximal", sparsity_on="bn_scale", target_sparsity=0.5, l1_target="below_budget",
              channel_score="taylor")
    cb = SparsityInduction([{"layers": layers, "l1_epochs": [2, 4]}], taylor_loss="class_balanced", **kw)
    torch.manual_seed(0)
    det = SSDDetector(["a", "b"], width_mult=0.125, batch_norm=True)
    det.training_step = SSDDetector.training_step.__get__(det)
    det.log = lambda *a, **k: None  # no trainer: the step's logging is not under test
    det._trainer = SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[{"lr": 0.0}])], global_step=0)
    trainer = SimpleNamespace(current_epoch=1, world_size=1, optimizers=[])
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9], [0.2, 0.3, 0.7, 0.8]])
    targets = [{"boxes": boxes[:2], "labels": torch.tensor([0, 0])}, {"boxes": boxes[2:], "labels": torch.tensor([1])}]
    images = torch.randint(0, 255, (2, 3, 300, 300), dtype=torch.uint8)
    norms = det.model.norms
    loss = det.training_step((images, targets), 0)
    assert torch.allclose(det.class_weights(), torch.tensor([0.75, 1.5]))  # counts 2 and 1: n / (K n_c)
    # the weighted loss by hand: each default box's terms times its target class's weight (background 1)
    loc, conf = det._last_step[:2]
    w = torch.tensor([1.0, 0.75, 1.5])
    manual = MultiBoxLoss()(loc, conf, det.model.priors, targets, class_weights=w)["loss"]
    assert torch.allclose(det.class_balanced_loss(), manual)
    assert torch.allclose(MultiBoxLoss()(loc, conf, det.model.priors, targets, class_weights=torch.ones(3))["loss"], loss)
    names = sorted(n for n in layers if n in norms)
    params = [t for n in names for t in (norms[n].weight, norms[n].bias)]
    g = torch.autograd.grad(manual, params, retain_graph=True)
    expected = {n: (g[2 * i] * norms[n].weight + g[2 * i + 1] * norms[n].bias).detach().pow(2) for i, n in enumerate(names)}
    cb.on_before_backward(trainer, det, loss)  # epoch 1: read at the start of epoch 2
    assert all(p.grad is None for p in det.parameters())  # the training gradients are not touched
    assert cb.state.taylor_steps == 1
    for n in names:
        assert torch.allclose(cb.state.taylor[n], expected[n])
    loss.backward()
    cb.on_before_optimizer_step(trainer, det, torch.optim.SGD(det.parameters(), lr=0.0))  # not summed a second time
    assert cb.state.taylor_steps == 1
    trainer.current_epoch = 3  # the last L1 epoch: the threshold takes the candidates, no score is read after it
    cb.on_before_backward(trainer, det, loss)
    assert cb.state.taylor_steps == 1
    with pytest.raises(ValueError, match="needs channel_score taylor"):
        SparsityInduction([{"layers": layers, "l1_epochs": [2, 4]}], taylor_loss="class_balanced",
                          **{**kw, "channel_score": "gamma_g"})
    with pytest.raises(ValueError, match="taylor_loss must be"):
        SparsityInduction([{"layers": layers, "l1_epochs": [2, 4]}], taylor_loss="balanced", **kw)
    plain = SimpleNamespace(model=det.model, quality="map50", evaluate=lambda *a: 0.0)
    with pytest.raises(TypeError, match="has no class_balanced_loss"):
        cb.setup(SimpleNamespace(callbacks=[cb], fast_dev_run=False, max_epochs=5, datamodule=None), plain, "fit")


def _budget_fixture():
    """A BatchNorm SSD (every scale random in [0.1, 1)), its BatchNorm layers, a stand-in trainer holding
    FilterSelection(min_width=8, round_to=8), and the dense params and MACs."""
    from types import SimpleNamespace

    from callbacks.budget import architecture_cost
    from callbacks.selection import FilterSelection
    from lightning_modules.detector import SSDDetector

    torch.manual_seed(0)
    det = SSDDetector(["a"], width_mult=0.125, batch_norm=True)
    model = det.model
    with torch.no_grad():
        for bn in model.norms.values():
            bn.weight.uniform_(0.1, 1.0)
    layers = [n for n in model.layer_names() if n in model.norms]
    sel = FilterSelection(s_F=1.0, s_F_min=1.0, s_G=1.0, min_width=8, round_to=8)
    trainer = SimpleNamespace(current_epoch=0, callbacks=[sel], strategy=SimpleNamespace(broadcast=lambda x, src=0: x))
    dense = {"params": sum(p.numel() for p in model.parameters()),
             "macs": architecture_cost(model, model.channels, "macs")}
    return det, layers, trainer, dense


def test_params_and_macs_budgets_together_meet_both():
    """target_params_x and target_macs_x at once: the architecture the selection keeps meets both budgets, with no
    fewer channels removed than either budget alone asks for; target_params / target_macs give them as counts."""
    from callbacks.budget import architecture_cost, kept_widths
    from callbacks.sparsity import SparsityInduction

    det, layers, trainer, dense = _budget_fixture()
    model = det.model
    removed, cost = {}, {}
    for name, kw in {"params": {"target_params_x": 4.0}, "macs": {"target_macs_x": 3.0},
                     "both": {"target_params_x": 4.0, "target_macs_x": 3.0},
                     "counts": {"target_params": dense["params"] / 4.0, "target_macs": dense["macs"] / 3.0}}.items():
        cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", **kw)
        cb.state.dense_stats = dict(dense)
        masks, _ = cb._channel_masks(trainer, det, 0)
        removed[name] = sum(int((~m).sum()) for m in masks.values())
        widths = kept_widths(model, masks, 8, 8)
        cost[name] = {m: architecture_cost(model, widths, m) for m in ("params", "macs")}
    assert cost["params"]["params"] <= dense["params"] / 4 and cost["macs"]["macs"] <= dense["macs"] / 3
    assert cost["both"]["params"] <= dense["params"] / 4 and cost["both"]["macs"] <= dense["macs"] / 3
    # each budget is met from some sparsity on, so both are met from the larger of the two (the binding one)
    assert removed["both"] == max(removed["params"], removed["macs"])
    assert removed["params"] != removed["macs"]  # the two budgets do bind at different points here
    assert removed["counts"] == removed["both"]  # the same budgets given as counts (deployment limits)
    with pytest.raises(ValueError, match="either as a ratio"):
        SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", target_params_x=4.0,
                          target_params=1000)


def test_fill_budget_spends_both_budgets_to_the_last_block_that_fits():
    """fill_budget: after the global tau meets both budgets, blocks of round_to channels come back while the
    architecture stays within both; the result meets both, removes fewer channels than tau alone, keeps each layer's
    best-scored channels, and no layer could take one more block without breaking a budget."""
    from callbacks.budget import architecture_cost, kept_widths
    from callbacks.selection import kept_width
    from callbacks.sparsity import SparsityInduction

    det, layers, trainer, dense = _budget_fixture()
    model = det.model
    budget = {"params": dense["params"] / 4.0, "macs": dense["macs"] / 3.0}
    out = {}
    for fill in (False, True):
        cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", target_params_x=4.0,
                               target_macs_x=3.0, fill_budget=fill)
        cb.state.dense_stats = dict(dense)
        masks, _ = cb._channel_masks(trainer, det, 0)
        widths = kept_widths(model, masks, 8, 8)
        out[fill] = masks, widths, {m: architecture_cost(model, widths, m) for m in budget}
    (masks, widths, cost), (_, plain, plain_cost) = out[True], out[False]
    assert all(cost[m] <= budget[m] for m in budget)
    assert sum(widths.values()) > sum(plain.values())  # something was put back ...
    assert all(widths[n] >= plain[n] for n in widths)  # ... and nothing taken away
    assert any(cost[m] > plain_cost[m] for m in budget)
    scores = cb._channel_scores(det, 0)
    for n, m in masks.items():
        assert int(m.sum()) == widths[n]
        if (~m).any():
            assert scores[n][m].min() >= scores[n][~m].max()  # the best-scored channels are the ones kept
    for n in masks:  # maximal: one more block anywhere breaks a budget
        if widths[n] < model.channels[n]:
            more = dict(widths, **{n: kept_width(widths[n] + 8, model.channels[n], 8, 8)})
            assert any(architecture_cost(model, more, m) > budget[m] for m in budget), n
    with pytest.raises(ValueError, match="fill_budget spends"):
        SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", fill_budget=True)


@pytest.mark.parametrize("net", ["ssd300", "vgg16"])
def test_bilinear_cost_is_architecture_cost_at_any_widths(net):
    """BilinearCost prices params and MACs without building a network; at random widths of every prunable layer it
    gives architecture_cost's figures exactly (SSD300 with heads on the source layers, VGG16 with the
    linear layer after the flatten)."""
    import random

    from callbacks.budget import BilinearCost, architecture_cost
    from lightning_modules.classifier import VGGClassifier
    from lightning_modules.detector import SSDDetector

    model = (VGGClassifier(list("abc"), size=32, width_mult=0.25) if net == "vgg16" else
             SSDDetector(["a", "b"], size=int(net[3:]), width_mult=0.125, batch_norm=True)).model
    names = [n for n in model.layer_names() if n in model.norms]
    cost = BilinearCost(model, names, ("params", "macs"))
    assert len(cost.pairs) == len(names) - 1  # each trunk layer reads the one before it
    rng = random.Random(0)
    for _ in range(3):
        widths = {n: rng.randint(1, model.channels[n]) for n in names}
        arch = dict(model.channels, **widths)
        assert cost(widths, "params") == architecture_cost(model, arch, "params")
        assert cost(widths, "macs") == architecture_cost(model, arch, "macs")
    before = torch.get_rng_state()  # counting draws nothing from the training's random stream
    architecture_cost(model, dict(model.channels), "params")
    assert torch.equal(torch.get_rng_state(), before)


def test_priced_budget_search_keeps_the_widths_of_building_every_candidate():
    """The threshold search and the fill price candidate widths with one BilinearCost per architecture (no network
    built per candidate) and choose exactly the widths that building and counting every candidate chooses. Pricing
    that says "fits" wrongly is caught when the chosen widths are built: a warning, and the choice made again with
    every candidate built."""
    from callbacks.budget import BilinearCost, architecture_cost
    from callbacks.sparsity import SparsityInduction

    det, layers, trainer, dense = _budget_fixture()
    model = det.model
    budget = {"params": dense["params"] / 4.0, "macs": dense["macs"] / 2.9}

    def choose(priced: bool, cb=None):
        cb = cb or SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale",
                                     target_params_x=4.0, target_macs_x=2.9, fill_budget=True)
        cb.state.dense_stats = dict(dense)
        if not priced:
            cb._pricer = lambda model: None
        masks, _ = cb._channel_masks(trainer, det, 0)
        return {n: int(m.sum()) for n, m in masks.items()}

    built = choose(priced=False)
    assert choose(priced=True) == built
    arch = dict(model.channels, **built)
    assert all(architecture_cost(model, arch, m) <= budget[m] for m in budget)
    with pytest.MonkeyPatch.context() as mp:  # prices 20 % low: the chosen widths overrun a budget once built
        price = BilinearCost.__call__
        mp.setattr(BilinearCost, "__call__", lambda self, w, m: int(0.8 * price(self, w, m)))
        assert choose(priced=True) == built  # caught by the check at the present widths: every candidate built
        mp.setattr(BilinearCost, "exact_at", lambda self, widths: True)  # a pricing that passed its check
        with pytest.warns(UserWarning, match="priced widths exceed a budget"):
            assert choose(priced=True) == built


def test_balanced_cost_exponent_spends_both_budgets_alike():
    """cost_exponent: balance: where the cost-blind ranking meets the MACs budget with parameters to spare (the
    costly high-resolution layers score highest), the exponent searched in [0, 1] spends the two budgets more alike
    than cost-blind (0) or fully priced (1) ranking does, the masks meet both budgets, and the exponent is logged.
    Without two budgets, or with another word, the config is refused."""
    from callbacks.budget import architecture_cost
    from callbacks.sparsity import SparsityInduction

    det, layers, trainer, dense = _budget_fixture()
    model = det.model
    with torch.no_grad():  # the early, costly layers score highest: cost-blind, the MACs budget binds first
        for i, n in enumerate(layers):
            model.norms[n].weight.mul_(4.0 if i < 7 else 1.0)
    logged = {}
    det.log = lambda key, value, **kw: logged.__setitem__(key, value)
    budget = {"params": dense["params"] / 3.0, "macs": dense["macs"] / 3.0}

    def spent(exponent):
        cb = SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", target_params_x=3.0,
                               target_macs_x=3.0, cost_exponent=exponent)
        cb.state.dense_stats = dict(dense)
        masks, _ = cb._channel_masks(trainer, det, 0)
        arch = dict(model.channels, **{n: int(m.sum()) for n, m in masks.items()})
        return {m: architecture_cost(model, arch, m) / budget[m] for m in budget}

    ends = {e: spent(e) for e in (0.0, 1.0)}
    assert ends[0.0]["macs"] > ends[0.0]["params"] + 0.05  # cost-blind: MACs bind, params left
    assert ends[1.0]["params"] > ends[1.0]["macs"] + 0.05  # fully priced: the other way round
    balanced = spent("balance")
    exponent = logged["prune/phase0/cost_exponent"]
    assert 0.0 < exponent < 1.0
    assert max(balanced.values()) <= 1.0
    gap = abs(balanced["macs"] - balanced["params"])
    assert gap < min(abs(s["macs"] - s["params"]) for s in ends.values())
    with pytest.raises(ValueError, match="give both"):
        SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", target_params_x=3.0,
                          cost_exponent="balance")
    with pytest.raises(ValueError, match="a number"):
        SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", target_params_x=3.0,
                          target_macs_x=3.0, cost_exponent="auto")


@pytest.mark.parametrize("root", [0.3, 0.8, -0.2, 1.4])
def test_balanced_exponent_bisects_towards_where_both_budgets_are_spent_alike(monkeypatch, root):
    """The search itself, on a stand-in whose spent MACs minus spent params is ``root - x``: it ends within one
    bisection step (1/64) of the root, and at the end of [0, 1] nearest to a root outside it."""
    from types import SimpleNamespace

    from callbacks.sparsity import SparsityInduction

    cb = SparsityInduction([{"layers": ["conv5_1"], "l1_epochs": [0, 1]}], sparsity_on="bn_scale",
                           target_params_x=3.0, target_macs_x=3.0, cost_exponent="balance")
    monkeypatch.setattr(cb, "_budgets", lambda: {"params": (1.0, "given"), "macs": (1.0, "given")})
    monkeypatch.setattr(cb, "_priced", lambda scores, cost, exponent: exponent)
    monkeypatch.setattr(cb, "_widths_for", lambda trainer, module, priced, min_width, round_to: {"x": priced})
    monkeypatch.setattr(cb, "_cost", lambda model, widths, m: 1.0 if m == "macs" else 1.0 - root + widths["x"])
    x = cb._balanced_exponent(None, SimpleNamespace(model=SimpleNamespace(channels={})), {}, {}, 1, 1)
    assert abs(x - min(max(root, 0.0), 1.0)) <= 1 / 64


def test_budget_report_says_what_each_budget_allowed_what_was_spent_and_which_bound():
    """summary.json's ``budgets`` block: per budget the allowance and its source, the final cost, the fraction spent
    and the compression; ``binding`` is the budget spent the most. None without a budget."""
    from callbacks.sparsity import SparsityInduction

    cb = SparsityInduction([{"layers": ["conv5_1"], "l1_epochs": [0, 1]}], sparsity_on="bn_scale", target_params_x=4.0,
                           target_macs_x=2.0)
    cb.state.dense_stats = {"params": 4000, "macs": 9000}
    report = cb.budget_report({"params": 1000, "macs": 3000})
    assert report == {"params": {"budget": 1000, "from": "dense / 4.0", "final": 1000, "spent": 1.0, "final_x": 4.0},
                      "macs": {"budget": 4500, "from": "dense / 2.0", "final": 3000, "spent": 0.6667, "final_x": 3.0},
                      "binding": "params"}
    assert cb.budget_report({"params": 900, "macs": 4400})["binding"] == "macs"
    plain = SparsityInduction([{"layers": ["conv5_1"], "l1_epochs": [0, 1]}], sparsity_on="bn_scale")
    plain.state.dense_stats = {"params": 4000, "macs": 9000}
    assert plain.budget_report({"params": 1000, "macs": 3000}) is None


def test_greedy_fill_puts_back_the_best_scored_block_first():
    """fill_budget's greedy fill, on two layers cut to 8 channels and a budget with room for one more block of 8:
    the block goes to the layer whose next 8 channels score higher, wherever that layer stands in the order."""
    from callbacks.sparsity import SparsityInduction

    ranked = {"a": torch.tensor([9.0] * 8 + [1.0] * 8), "b": torch.tensor([9.0] * 8 + [5.0] * 8)}
    for names in (("a", "b"), ("b", "a")):
        widths = SparsityInduction._greedy_fill({n: 8 for n in names}, {n: ranked[n] for n in names},
                                                lambda w: sum(w.values()) <= 24, 8, 8)
        assert widths == {"a": 8, "b": 16}


def test_fill_swap_trades_blocks_for_more_score_within_both_budgets():
    """fill_swap: after the greedy fill, one block out of a layer and the others refilled while that adds score in
    all. From the same tau, the result meets both budgets (built and counted), has more total score than the greedy
    fill, no single such trade would add more, and a network whose cost BilinearCost cannot reproduce (or whose traded
    widths overrun a budget once built) keeps the greedy fill, with a warning."""
    import warnings

    from callbacks.budget import BilinearCost, architecture_cost
    from callbacks.selection import kept_width
    from callbacks.sparsity import SparsityInduction, masks_for_tau

    det, layers, trainer, dense = _budget_fixture()
    model = det.model
    budget = {"params": dense["params"] / 4.0, "macs": dense["macs"] / 3.0}
    cbs = {swap: SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale",
                                   target_params_x=4.0, target_macs_x=3.0, fill_budget=True, fill_swap=swap)
           for swap in (False, True)}
    for cb in cbs.values():
        cb.state.dense_stats = dict(dense)
    scores = cbs[True]._channel_scores(det, 0)
    tau = cbs[True]._channel_tau(trainer, det, 0, scores)
    counts = {n: int(m.sum()) for n, m in masks_for_tau(scores, tau).items()}
    greedy = cbs[False]._fill(model, scores, counts, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        swapped = cbs[True]._fill(model, scores, counts, 8, 8)
    ranked = {n: sc.sort(descending=True, stable=True).values for n, sc in scores.items()}

    def value(w):
        return sum(float(ranked[n][: w[n]].double().sum()) for n in w)

    arch = dict(model.channels, **swapped)
    assert all(architecture_cost(model, arch, m) <= budget[m] for m in budget)
    assert value(swapped) > value(greedy) + 1e-6
    cost = BilinearCost(model, list(swapped), ("params", "macs"))
    for n in swapped:  # a local optimum: no one-block trade out of any layer adds score
        fewer = kept_width(swapped[n] - 8, model.channels[n], 8, 8)
        if fewer < swapped[n]:
            trial = SparsityInduction._greedy_fill(dict(swapped, **{n: fewer}), ranked,
                                                   lambda w: all(cost(w, m) <= budget[m] for m in budget), 8, 8,
                                                   frozenset({n}))
            assert value(trial) <= value(swapped) + 1e-6, n
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BilinearCost, "__init__", lambda self, *a: None)
        mp.setattr(BilinearCost, "exact_at", lambda self, widths: False)
        cbs[True]._pricer_cache = None  # made once per architecture: made again under the patch
        with pytest.warns(UserWarning, match="not bilinear"):
            assert cbs[True]._swap(model, greedy, ranked, 8, 8) == greedy
    with pytest.MonkeyPatch.context() as mp:  # prices 20 % low: the trades overrun a budget once built
        price = BilinearCost.__call__
        mp.setattr(BilinearCost, "__call__", lambda self, w, m: int(0.8 * price(self, w, m)))
        mp.setattr(BilinearCost, "exact_at", lambda self, widths: True)
        cbs[True]._pricer_cache = None
        with pytest.warns(UserWarning, match="exceed a budget when the network is built"):
            assert cbs[True]._swap(model, greedy, ranked, 8, 8) == greedy
    with pytest.raises(ValueError, match="fill_swap improves"):
        SparsityInduction([{"layers": layers, "l1_epochs": [0, 1]}], sparsity_on="bn_scale", target_params_x=4.0,
                          fill_swap=True)


def test_restarted_learning_rate_ramps_to_the_peak_then_decays_to_zero():
    from callbacks.retrain import check_retrain_lr, restarted_factor

    f = restarted_factor(start=100, end=200, peak=0.8, ramp=0.1, from_factor=0.3)
    assert f(100) == pytest.approx(0.3) and f(105) == pytest.approx(0.55) and f(110) == pytest.approx(0.8)
    tail = [f(i) for i in range(110, 201)]
    assert all(a >= b for a, b in zip(tail, tail[1:])) and f(200) == pytest.approx(0.0, abs=1e-12)
    assert f(250) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    no_ramp = restarted_factor(start=0, end=10, peak=1.0, ramp=0.0, from_factor=0.1)
    assert no_ramp(0) == pytest.approx(1.0) and no_ramp(5) == pytest.approx(0.5)
    for bad in ({"retrain_lr": "rewind"}, {"peak": 0.0}, {"ramp": 1.0}):
        with pytest.raises(ValueError):
            check_retrain_lr(**{"retrain_lr": "restart", "peak": 1.0, "ramp": 0.1, **bad})
