"""`StabilityAnalyzer` end to end: exact least-squares cases, the three training paths, parity, fixes."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import random
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stabwatch.analysis import (
    AnalysisResults,
    AnalysisWarning,
    AnalyzerConfig,
    StabilityAnalyzer,
    TrainStep,
    TrajectoryMetrics,
)
from stabwatch.errors import StabwatchError
from stabwatch.sinks import JsonlSink, read_jsonl
from tests.analysis.analysis_helpers import make_train_fn, mlp, mse_step, regression_loader


def _weights(models) -> np.ndarray:
    return np.stack([torch.cat([p.detach().double().reshape(-1) for p in m.parameters()]).numpy() for m in models])


def _spread_from_offsets(offsets: np.ndarray) -> np.ndarray:
    """RMS pairwise distance of ``[T, N, d]`` positions, by explicit loops."""
    out = []
    for xt in offsets:
        n = xt.shape[0]
        d2 = [np.sum((xt[i] - xt[j]) ** 2) for i in range(n) for j in range(i + 1, n)]
        out.append(math.sqrt(np.mean(d2)))
    return np.array(out)


def _initial_weights(model, **kw) -> np.ndarray:
    twin = StabilityAnalyzer(model, verbose=False, **kw)
    twin.start_recording()
    return _weights(twin.get_models())


def _least_squares_train_fn(eta):
    def train_fn(model, loader, n_epochs):
        opt = torch.optim.SGD(model.parameters(), lr=eta)
        for _ in range(n_epochs):
            for x, y in loader:
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
        return {"loss": [0.0]}

    return train_fn


# ---------------------------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("case", ["expanding", "contracting"])
@pytest.mark.parametrize("path", ["vectorized", "sequential", "train_fn"])
def test_least_squares_replicas_move_exactly_as_gradient_descent_predicts(case, path, request, quiet):
    ls = request.getfixturevalue(case)
    n_epochs = 6
    kw = {"n_trajectories": 4, "perturbation_scale": 0.02}
    w0 = _initial_weights(ls.model(), **kw)
    train = {
        "vectorized": ls.step(vectorize=True),
        "sequential": ls.step(vectorize=False),
        "train_fn": _least_squares_train_fn(ls.eta),
    }[path]
    results = StabilityAnalyzer(ls.model(), verbose=False, **kw).analyze(train, ls.batches, n_epochs)

    want = _spread_from_offsets(ls.predicted_differences(w0, n_epochs))
    np.testing.assert_allclose(results.spread_evolution, want, rtol=2e-4)
    # ratio and exponent come from the same spread
    assert results.convergence_ratio == pytest.approx(want[-1] / want[0], rel=5e-4)
    assert results.lyapunov == pytest.approx(math.log(results.convergence_ratio) / n_epochs, rel=1e-9)
    # after the transient, the growth per epoch is m * log max|1 - eta h|
    rate = ls.steps_per_epoch * math.log(ls.rho)
    assert results.local_lyapunov[-1] == pytest.approx(rate, abs=2e-3)
    low, high = results.local_lyapunov_ci[-1]
    assert low - 1e-3 <= rate <= high + 1e-3
    assert results.behavior == ("divergent" if ls.rho > 1 else "convergent")
    np.testing.assert_array_equal(results.checkpoint_times, np.arange(n_epochs + 1))


@pytest.mark.parametrize(("case", "rtol"), [("contracting", 2e-4), ("expanding", 2e-3)])
def test_benettin_renormalisation_is_exact_for_a_linear_map(case, rtol, request, quiet):
    """Linear dynamics: rescaling the offsets commutes with training, so virtual distances are exact.

    (In the expanding case the weights themselves blow up by 1.25 per step while the renormalised
    offsets stay at 2e-2, so float32 rounding costs ~1e-3 relative: hence the looser tolerance.)
    """
    ls = request.getfixturevalue(case)
    n_epochs = 5
    kw = {"n_trajectories": 4, "perturbation_scale": 0.02}
    w0 = _initial_weights(ls.model(), **kw)
    res = StabilityAnalyzer(ls.model(), verbose=False, renormalize=True, **kw).analyze(ls.step(), ls.batches, n_epochs)
    offsets = ls.predicted_differences(w0, n_epochs)  # [T, N, d], replica 0 at 0
    want = np.sqrt(np.mean(np.sum(offsets[:, 1:] ** 2, axis=-1), axis=1))
    np.testing.assert_allclose(res.spread_evolution, want, rtol=rtol)
    assert res.renormalized
    # the replicas themselves were pulled back to their initial distance from replica 0 every epoch
    measured = res.pairwise_distances[:, 0, 1:]
    np.testing.assert_allclose(measured[0], np.linalg.norm(offsets[0, 1:], axis=-1), rtol=1e-6)
    per_epoch = np.linalg.norm(ls.predicted_differences(w0, 1)[1, 1:], axis=-1)
    np.testing.assert_allclose(measured[1], per_epoch, rtol=rtol)
    assert np.all(measured[1:] <= ls.rho**ls.steps_per_epoch * measured[0] * (1 + 1e-3))


class _DoubleWell(nn.Module):
    """Loss sum(((w - c)^2 - 1)^2) / 4: gradient descent is unstable at w = c with factor 1 + eta."""

    def __init__(self, dim: int = 8, center: float = 3.0) -> None:
        super().__init__()
        self.center = center
        self.w = nn.Parameter(torch.full((dim,), center))

    def loss(self) -> torch.Tensor:
        return (((self.w - self.center) ** 2 - 1.0) ** 2).sum() / 4.0


def test_saturation_is_reported_and_renormalisation_removes_it():
    eta, steps, n_epochs = 0.5, 4, 12
    step = TrainStep(lambda m, b: m.loss(), functools.partial(torch.optim.SGD, lr=eta))
    batches = [torch.zeros(1)] * steps
    kw = {"n_trajectories": 4, "perturbation_scale": 1e-4, "verbose": False}
    with pytest.warns(AnalysisWarning, match="saturates"):
        raw = StabilityAnalyzer(_DoubleWell(), **kw).analyze(step, batches, n_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnalysisWarning)
        renorm = StabilityAnalyzer(_DoubleWell(), renormalize=True, **kw).analyze(step, batches, n_epochs)
    true_rate = steps * math.log(1.0 + eta)
    assert renorm.lyapunov == pytest.approx(true_rate, rel=2e-3)
    np.testing.assert_allclose(renorm.local_lyapunov, true_rate, rtol=5e-3)
    assert raw.lyapunov < 0.75 * true_rate  # the raw spread saturated at the wells
    assert any("saturates" in d for d in raw.diagnostics)
    assert not renorm.diagnostics


# ---------------------------------------------------------------------------------------------- train_fn path


def test_train_fn_is_called_once_per_epoch_like_deep_lyapunov(quiet):
    calls, returned = [], {}
    base_fn = make_train_fn(lr=0.01, optimizer=torch.optim.Adam)
    loader = regression_loader()

    def train_fn(model, loader_arg, n_epochs):
        assert loader_arg is loader  # the user's own object, unwrapped
        calls.append((id(model), n_epochs))
        returned.setdefault(id(model), []).append(base_fn(model, loader_arg, n_epochs)["loss"][-1])
        return {"loss": returned[id(model)][-1]}

    kw = {"n_trajectories": 3}
    analyzer = StabilityAnalyzer(mlp(), verbose=False, **kw)
    results = analyzer.analyze(train_fn, loader, 4)
    models = analyzer.get_models()
    ids = [id(m) for m in models]
    assert calls == [(i, 1) for _ in range(4) for i in ids]  # epoch-major, always n_epochs=1
    assert results.n_checkpoints == 5
    np.testing.assert_array_equal(results.checkpoint_times, [0, 1, 2, 3, 4])
    for m, tm in zip(models, results.trajectory_metrics, strict=True):
        assert tm.final_loss == returned[id(m)][-1]

    twin = StabilityAnalyzer(mlp(), verbose=False, **kw)
    twin.start_recording()
    restarted = copy.deepcopy(twin.get_models()[2])
    for _ in range(4):  # deep-lyapunov's calls: a fresh Adam every epoch
        base_fn(restarted, loader, 1)
    np.testing.assert_allclose(_weights([models[2]]), _weights([restarted]), atol=1e-6)


def test_fixed_steps_per_epoch_train_fn_trains_every_epoch(quiet):
    def train_fn(model, loader, n_epochs):
        assert isinstance(loader, DataLoader)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(n_epochs):
            for step, (x, y) in enumerate(loader):
                if step == 2:  # a fixed number of steps per epoch: the loader is never exhausted
                    break
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()
        return {"loss": [0.0]}

    n_epochs = 5
    results = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(train_fn, regression_loader(), n_epochs)
    assert results.n_checkpoints == n_epochs + 1
    np.testing.assert_array_equal(results.checkpoint_times, np.arange(n_epochs + 1))
    assert len({round(float(s), 12) for s in results.spread_evolution}) == n_epochs + 1
    assert math.isclose(results.lyapunov, math.log(results.convergence_ratio) / n_epochs, rel_tol=1e-9)


def test_a_loader_passed_through_kwargs_reaches_train_fn_unchanged(quiet):
    loader = regression_loader(shuffle=True)
    seen: list[object] = []

    def train_fn(model, _unused, n_epochs, data=None, lr=0.0):
        seen.append(data)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for x, y in data:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        return {"loss": 0.0}

    results = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(
        train_fn, [None], 2, data=loader, lr=0.05
    )
    assert len(seen) == 6 and all(d is loader for d in seen)
    assert results.n_checkpoints == 3 and np.isfinite(results.lyapunov)


def test_train_fn_that_never_iterates_the_loader_still_gets_a_checkpoint_per_epoch(quiet):
    x, y = torch.randn(32, 6), torch.randn(32, 3)

    def train_fn(model, loader, n_epochs):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(n_epochs):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    results = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(train_fn, regression_loader(), 3)
    np.testing.assert_array_equal(results.checkpoint_times, [0, 1, 2, 3])


def test_errors_raised_by_train_fn_propagate_unchanged():
    def train_fn(model, loader, n_epochs):
        for _ in loader:
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(train_fn, regression_loader(), 2)


def test_evaluation_passes_over_the_train_loader_are_not_epochs(quiet):
    base = make_train_fn()

    def train_fn(model, loader, n_epochs):
        out = base(model, loader, n_epochs)
        with torch.no_grad():
            for x, _ in loader:  # evaluation pass: no parameter changes
                model(x)
        return out

    results = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(train_fn, regression_loader(), 3)
    np.testing.assert_array_equal(results.checkpoint_times, [0, 1, 2, 3])


# ---------------------------------------------------------------------------------------------- data order and RNG


def _order_recording_train_fn(seen):
    def train_fn(model, loader, n_epochs):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(n_epochs):
            for idx, x, y in loader:
                seen.setdefault(id(model), []).append(idx.tolist())
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                opt.step()

    return train_fn


@pytest.mark.parametrize("own_generator", [False, True])
def test_every_replica_sees_the_same_shuffled_order(own_generator, quiet):
    n = 48
    data = TensorDataset(torch.arange(n), torch.randn(n, 6), torch.randn(n, 3))
    gen = torch.Generator().manual_seed(9) if own_generator else None
    loader = DataLoader(data, batch_size=12, shuffle=True, generator=gen)
    seen: dict[int, list[list[int]]] = {}
    StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(_order_recording_train_fn(seen), loader, 3)
    orders = list(seen.values())
    assert len(orders) == 3 and all(o == orders[0] for o in orders)
    epochs = [[i for batch in orders[0][k * 4 : (k + 1) * 4] for i in batch] for k in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # it is shuffled, identically for every replica

    seen_diff: dict[int, list[list[int]]] = {}
    StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False, same_data_order=False).analyze(
        _order_recording_train_fn(seen_diff), loader, 3
    )
    orders = list(seen_diff.values())
    assert orders[0] != orders[1] and orders[1] != orders[2]


@pytest.mark.parametrize("vectorize", [None, False])
def test_shuffled_loader_gives_the_same_numbers_as_a_fixed_order_when_replicas_share_it(vectorize, quiet):
    """Data-order noise is not divergence: with its own order per replica the same run looks chaotic."""
    data = TensorDataset(torch.randn(64, 6), torch.randn(64, 3))
    kw = {"n_trajectories": 4, "perturbation_scale": 1e-4, "verbose": False}
    shared = StabilityAnalyzer(mlp(), **kw).analyze(
        mse_step(0.1, vectorize=vectorize), DataLoader(data, batch_size=16, shuffle=True), 3
    )
    separate = StabilityAnalyzer(mlp(), same_data_order=False, **kw).analyze(
        mse_step(0.1, vectorize=vectorize), DataLoader(data, batch_size=16, shuffle=True), 3
    )
    assert shared.convergence_ratio < 2.0
    assert separate.convergence_ratio > 10 * shared.convergence_ratio


def test_all_three_paths_agree_on_a_shuffled_loader_with_its_own_generator(quiet):
    """The vectorised probe step must not advance the loader's generator (it used to shift the order)."""

    def loader():
        data = TensorDataset(torch.randn(48, 6, generator=torch.Generator().manual_seed(1)), torch.randn(48, 3))
        return DataLoader(data, batch_size=12, shuffle=True, generator=torch.Generator().manual_seed(5))

    kw = {"n_trajectories": 3, "verbose": False}
    vec = StabilityAnalyzer(mlp(), **kw).analyze(mse_step(), loader(), 3)
    seq = StabilityAnalyzer(mlp(), **kw).analyze(mse_step(vectorize=False), loader(), 3)
    fn = StabilityAnalyzer(mlp(), **kw).analyze(make_train_fn(), loader(), 3)
    np.testing.assert_allclose(vec.spread_evolution, fn.spread_evolution, rtol=1e-5)
    np.testing.assert_allclose(seq.spread_evolution, fn.spread_evolution, rtol=1e-6)


@pytest.mark.parametrize("use_step", [True, False])
def test_the_callers_global_rng_is_left_untouched(use_step, quiet):
    model, loader = mlp(), regression_loader(shuffle=True)  # mlp() seeds torch itself
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    train = mse_step() if use_step else make_train_fn()
    StabilityAnalyzer(model, n_trajectories=3, verbose=False).analyze(train, loader, 2)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_analysis_is_reproducible_and_leaves_the_model_alone(quiet):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    a = StabilityAnalyzer(model, n_trajectories=3, verbose=False).analyze(
        mse_step(), regression_loader(shuffle=True), 2
    )
    b = StabilityAnalyzer(model, n_trajectories=3, verbose=False).analyze(
        mse_step(), regression_loader(shuffle=True), 2
    )
    np.testing.assert_array_equal(a.spread_evolution, b.spread_evolution)
    assert model.state_dict().keys() == before.keys() and len(before) > 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# ---------------------------------------------------------------------------------------------- vectorised path


def test_dropout_noise_is_shared_and_the_vectorised_path_matches_the_sequential_one(quiet):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    kw = {"n_trajectories": 3, "verbose": False}
    vec = StabilityAnalyzer(model(), **kw).analyze(mse_step(vectorize=True), regression_loader(shuffle=True), 3)
    seq = StabilityAnalyzer(model(), **kw).analyze(mse_step(vectorize=False), regression_loader(shuffle=True), 3)
    np.testing.assert_allclose(vec.spread_evolution, seq.spread_evolution, rtol=1e-4)


def test_batchnorm_model_trains_and_agrees_with_the_sequential_path(quiet):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    kw = {"n_trajectories": 3, "verbose": False}
    auto = StabilityAnalyzer(model(), **kw)
    res_auto = auto.analyze(mse_step(), regression_loader(), 3)
    res_seq = StabilityAnalyzer(model(), **kw).analyze(mse_step(vectorize=False), regression_loader(), 3)
    np.testing.assert_allclose(res_auto.spread_evolution, res_seq.spread_evolution, rtol=1e-4)
    bn = auto.get_models()[1][1]
    assert not torch.allclose(bn.running_mean, torch.zeros(16))  # running stats were updated


def test_get_models_after_vectorised_training_shows_the_trained_replicas(quiet):
    analyzer = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False)
    results = analyzer.analyze(mse_step(), regression_loader(), 2)
    w = _weights(analyzer.get_models())
    final = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=-1)
    np.testing.assert_allclose(final, results.pairwise_distances[-1], rtol=1e-6, atol=1e-12)

    # afterwards every replica owns ordinary contiguous tensors: changing one leaves the others alone
    models = analyzer.get_models()
    assert all(t.is_contiguous() for m in models for t in [*m.parameters(), *m.buffers()])
    with torch.no_grad():
        models[1][0].weight.add_(1.0)
    moved = _weights(models)
    np.testing.assert_array_equal(moved[[0, 2]], w[[0, 2]])


def test_stacked_parameters_take_the_layout_their_gradient_arrives_in():
    from stabwatch.analysis._training import _adopt_layouts

    t = torch.randn(3, 4, 5, requires_grad=True)
    values, optimizer = t.detach().clone(), torch.optim.SGD([t], lr=0.1)
    incoming = torch.empty(3, 5, 4).transpose(1, 2)  # what vmap's backward of a batched linear returns
    _adopt_layouts({"w": t}, {"w": incoming})
    assert t.stride() == incoming.stride() and not t.is_contiguous() and torch.equal(t.detach(), values)
    assert optimizer.param_groups[0]["params"][0] is t  # the same tensor object, re-laid out in place


def test_stacked_view_reads_any_memory_layout_in_row_major_order():
    from stabwatch.analysis._views import StackedView

    n = 3
    reference = torch.arange(n * 4 * 5 * 6, dtype=torch.float32).reshape(n, 4, 5, 6)
    permuted = torch.empty(n, 6, 5, 4).permute(0, 3, 2, 1)
    permuted.copy_(reference)
    matrix = torch.empty(n, 7, 2).transpose(1, 2)
    matrix.copy_(torch.arange(n * 14, dtype=torch.float32).reshape(n, 2, 7))
    view = StackedView({"w": permuted, "m": matrix}, {}, None)
    for start, stop in [(0, 120), (0, 7), (13, 61), (29, 31), (119, 120), (30, 60)]:
        assert torch.equal(view.columns(0, start, stop), reference.reshape(n, -1)[:, start:stop])
    assert torch.equal(view.columns(1, 3, 11), matrix.reshape(n, -1)[:, 3:11])


def test_loss_fn_must_return_a_scalar():
    bad = TrainStep(lambda m, b: F.mse_loss(m(b[0]), b[1], reduction="none"))
    with pytest.raises(StabwatchError, match="scalar"):
        StabilityAnalyzer(mlp(), n_trajectories=2, verbose=False).analyze(bad, regression_loader(), 1)


# ---------------------------------------------------------------------------------------------- fixes


def test_record_interval_keeps_the_initial_and_final_snapshots(quiet):
    res = StabilityAnalyzer(mlp(), n_trajectories=3, record_interval=2, verbose=False).analyze(
        mse_step(), regression_loader(), 5
    )
    np.testing.assert_array_equal(res.checkpoint_times, [0, 2, 4, 5])
    full = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(mse_step(), regression_loader(), 5)
    np.testing.assert_allclose(res.spread_evolution, full.spread_evolution[[0, 2, 4, 5]], rtol=1e-10)
    assert res.lyapunov == pytest.approx(full.lyapunov, rel=1e-10)  # per epoch, not per checkpoint


class _WithScalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 3)
        self.gain = nn.Parameter(torch.tensor([0.5]))
        self.zero_bias = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.gain * self.lin(x) + self.zero_bias


def test_one_element_and_all_zero_parameters_are_perturbed_not_nan(quiet):
    analyzer = StabilityAnalyzer(_WithScalar(), n_trajectories=3, verbose=False)
    analyzer.start_recording()
    replicas = analyzer.get_models()
    assert len(replicas) == 3
    for r in replicas[1:]:
        assert torch.isfinite(r.gain).all() and r.gain.item() != 0.5
        assert r.gain.item() == pytest.approx(0.5, abs=0.05)
        assert torch.count_nonzero(r.zero_bias) == 3
    res = StabilityAnalyzer(_WithScalar(), n_trajectories=3, verbose=False).analyze(mse_step(), regression_loader(), 2)
    assert np.isfinite(res.spread_evolution).all() and math.isfinite(res.lyapunov)


@pytest.mark.parametrize("use_step", [True, False])
def test_bf16_models_work_and_warn_about_resolution(use_step):
    model = mlp().to(torch.bfloat16)

    def train_fn(m, loader, n_epochs):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(n_epochs):
            for x, y in loader:
                opt.zero_grad()
                F.mse_loss(m(x.bfloat16()).float(), y).backward()
                opt.step()

    step = TrainStep(
        lambda m, b: F.mse_loss(m(b[0].bfloat16()).float(), b[1]), functools.partial(torch.optim.SGD, lr=0.05)
    )
    with pytest.warns(AnalysisWarning, match="resolution"):
        res = StabilityAnalyzer(model, n_trajectories=3, verbose=False).analyze(
            step if use_step else train_fn, regression_loader(), 2
        )
    assert np.isfinite(res.spread_evolution).all() and res.spread_evolution[0] > 0


def test_a_perturbation_lost_to_rounding_is_an_error_and_a_small_one_a_warning():
    with pytest.raises(StabwatchError, match="below the resolution"):
        StabilityAnalyzer(mlp(), n_trajectories=3, perturbation_scale=1e-12, verbose=False).start_recording()
    with pytest.warns(AnalysisWarning, match="resolution"):
        StabilityAnalyzer(mlp(), n_trajectories=3, perturbation_scale=1e-7, verbose=False).start_recording()
    with warnings.catch_warnings():
        warnings.simplefilter("error", AnalysisWarning)
        StabilityAnalyzer(mlp(), n_trajectories=3, perturbation_scale=1e-3, verbose=False).start_recording()


def test_effective_dimensionality_is_exact_above_deep_lyapunovs_limit(quiet):
    """60k parameters: deep-lyapunov's P x P covariance failed and it reported 1.0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.Tanh(), nn.Linear(300, 3))
    x, y = torch.randn(64, 200), torch.randn(64, 3)
    analyzer = StabilityAnalyzer(model, n_trajectories=3, verbose=False, n_pca_components=4)
    analyzer.start_recording()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in analyzer.get_models()]
    snaps = [_weights(analyzer.get_models())]
    for _ in range(4):
        for m, opt in zip(analyzer.get_models(), opts, strict=True):
            opt.zero_grad()
            F.mse_loss(m(x), y).backward()
            opt.step()
        analyzer.record_checkpoint()
        snaps.append(_weights(analyzer.get_models()))
    res = analyzer.compute_metrics()
    assert res.n_parameters > 50_000 and res.pca_method == "exact"
    pts = np.concatenate(snaps)  # [T*N, P], t-major like the results
    pts -= pts.mean(axis=0)
    u, s, _ = np.linalg.svd(pts, full_matrices=False)
    lam = s**2
    assert res.effective_dimensionality == pytest.approx(lam.sum() ** 2 / np.sum(lam**2), rel=1e-6)
    want = (u[:, :4] * s[:4]).reshape(5, 3, 4)
    for c in range(4):
        sign = np.sign(np.sum(res.pca_trajectories[..., c] * want[..., c]))
        np.testing.assert_allclose(res.pca_trajectories[..., c], sign * want[..., c], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(res.pca_explained_variance, lam[:4] / lam.sum(), rtol=1e-6)
    spread = _spread_from_offsets(np.stack(snaps))
    np.testing.assert_allclose(res.spread_evolution, spread, rtol=1e-10)
    steps = np.linalg.norm(np.diff(np.stack(snaps), axis=0), axis=-1)  # [T-1, N]
    assert len(res.trajectory_metrics) == 3
    for i, tm in enumerate(res.trajectory_metrics):
        assert tm.path_length == pytest.approx(steps[:, i].sum(), rel=1e-9)
        assert tm.velocity_mean == pytest.approx(steps[:, i].mean(), rel=1e-9)
        assert tm.velocity_std == pytest.approx(steps[:, i].std(), rel=1e-6, abs=1e-12)


def test_projection_kicks_in_past_the_memory_budget(quiet):
    exact = StabilityAnalyzer(mlp(), n_trajectories=4, verbose=False).analyze(mse_step(), regression_loader(), 4)
    sketched = StabilityAnalyzer(
        mlp(), n_trajectories=4, verbose=False, max_exact_bytes=0, projection_dim=4096
    ).analyze(mse_step(), regression_loader(), 4)
    assert exact.pca_method == "exact"
    assert sketched.pca_method.startswith("projection")
    # k >= P: the projection is an isometry, so everything matches
    assert sketched.effective_dimensionality == pytest.approx(exact.effective_dimensionality, rel=1e-8)
    np.testing.assert_array_equal(sketched.spread_evolution, exact.spread_evolution)


def test_track_gradients_records_gradient_norms(quiet):
    res = StabilityAnalyzer(mlp(), n_trajectories=3, track_gradients=True, verbose=False).analyze(
        mse_step(), regression_loader(), 2
    )
    assert res.gradient_norms is not None and res.gradient_norms.shape == (3, 3)
    assert np.isnan(res.gradient_norms[0]).all()
    assert (res.gradient_norms[1:] > 0).all()


# ---------------------------------------------------------------------------------------------- manual mode


def test_manual_mode_matches_analyze_with_the_same_training(quiet):
    loader = regression_loader()
    auto = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False).analyze(make_train_fn(), loader, 3)
    manual = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False)
    manual.start_recording()
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in manual.get_models()]
    for _ in range(3):
        for m, opt in zip(manual.get_models(), opts, strict=True):
            for x, y in loader:
                opt.zero_grad()
                F.mse_loss(m(x), y).backward()
                opt.step()
        manual.record_checkpoint()
    res = manual.compute_metrics([{"loss": [0.3, 0.2], "accuracy": [0.5, 0.9]}] * 3)
    np.testing.assert_allclose(res.spread_evolution, auto.spread_evolution, rtol=1e-6)
    assert res.trajectory_metrics[1].final_loss == 0.2
    assert res.trajectory_metrics[1].final_accuracy == 0.9


def test_manual_mode_record_interval_records_the_last_call_at_compute_time(quiet):
    analyzer = StabilityAnalyzer(mlp(), n_trajectories=3, record_interval=2, verbose=False)
    analyzer.start_recording()
    for _ in range(5):
        with torch.no_grad():
            for m in analyzer.get_models():
                for p in m.parameters():
                    p.mul_(1.1)
        analyzer.record_checkpoint()
    res = analyzer.compute_metrics()
    np.testing.assert_array_equal(res.checkpoint_times, [0, 2, 4, 5])
    assert res.convergence_ratio == pytest.approx(1.1**5, rel=1e-5)
    assert res.lyapunov == pytest.approx(math.log(1.1), rel=1e-5)


def test_manual_mode_warns_when_the_original_model_is_trained_instead_of_the_replicas():
    model = mlp()
    analyzer = StabilityAnalyzer(model, n_trajectories=3, verbose=False)
    analyzer.start_recording()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    with pytest.warns(AnalysisWarning, match="get_models"):
        analyzer.record_checkpoint()


def test_wrong_state_errors_are_runtime_errors_with_deep_lyapunovs_messages():
    analyzer = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False)
    with pytest.raises(RuntimeError, match="Not recording"):
        analyzer.record_checkpoint()
    with pytest.raises(RuntimeError, match="Models not created"):
        analyzer.get_models()
    analyzer.start_recording()
    with pytest.raises(RuntimeError, match="Already recording"):
        analyzer.start_recording()
    with pytest.raises(StabwatchError, match="Insufficient trajectory data"):
        analyzer.compute_metrics()
    analyzer.reset()
    assert not analyzer._is_recording and analyzer._n_checkpoints == 0


# ---------------------------------------------------------------------------------------------- config and parity


@pytest.mark.parametrize(
    "bad",
    [
        {"perturbation_scale": 0.0},
        {"perturbation_scale": -1.0},
        {"perturbation_scale": float("nan")},
        {"n_trajectories": 1},
        {"n_pca_components": 0},
        {"record_interval": 0},
        {"device": "gpu"},
        {"projection_dim": 0},
        {"max_exact_bytes": -1},
        {"renormalize": "yes"},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError) as info:
        AnalyzerConfig(**bad)
    assert isinstance(info.value, StabwatchError)
    assert next(iter(bad)) in str(info.value)


def test_public_signature_and_defaults_match_deep_lyapunov():
    sig = inspect.signature(StabilityAnalyzer.__init__).parameters
    expected = {
        "perturbation_scale": 0.01,
        "n_trajectories": 5,
        "n_pca_components": 10,
        "track_gradients": False,
        "record_interval": 1,
        "device": "auto",
        "seed": 42,
        "verbose": True,
        "config": None,
    }
    names = list(sig)[1:]
    assert names[: 1 + len(expected)] == ["model", *expected]
    for name, default in expected.items():
        assert sig[name].default == default
    cfg = AnalyzerConfig()
    for name, default in expected.items():
        if name != "config":
            assert getattr(cfg, name) == default
    analyze = list(inspect.signature(StabilityAnalyzer.analyze).parameters)
    assert analyze[:5] == ["self", "train_fn", "train_loader", "n_epochs", "test_loader"]
    first = [f for f in AnalysisResults.__dataclass_fields__][:11]
    assert first == [
        "convergence_ratio",
        "lyapunov",
        "behavior",
        "spread_evolution",
        "pca_trajectories",
        "pca_explained_variance",
        "effective_dimensionality",
        "trajectory_metrics",
        "n_trajectories",
        "n_checkpoints",
        "n_parameters",
    ]
    assert list(TrajectoryMetrics.__dataclass_fields__) == [
        "trajectory_id",
        "final_loss",
        "final_accuracy",
        "path_length",
        "velocity_mean",
        "velocity_std",
    ]


def test_config_object_replaces_individual_settings():
    analyzer = StabilityAnalyzer(mlp(), config=AnalyzerConfig(n_trajectories=7, device="cpu"))
    assert analyzer.config.n_trajectories == 7
    assert analyzer._device == "cpu"
    assert analyzer.model is not None


# ---------------------------------------------------------------------------------------------- sinks


class _ListSink:
    close_timeout = 0.5  # how long the analyzer waits for its sinks (a failing one never confirms)

    def __init__(self) -> None:
        self.records = []
        self.flushed_at = []  # how many records had arrived at each flush

    def write(self, record) -> None:
        self.records.append(record)

    def flush(self) -> None:
        self.flushed_at.append(len(self.records))

    def close(self) -> None:
        pass


class _BrokenSink(_ListSink):
    """A tracker that is down until ``down`` is set to False (fault injection)."""

    def __init__(self, spill_dir) -> None:
        super().__init__()
        self.spill_dir = spill_dir  # where the dispatcher spills this sink's records
        self.down = True

    def write(self, record) -> None:
        if self.down:
            raise OSError("disk full")
        super().write(record)


def test_results_are_written_to_sinks_one_record_per_checkpoint(tmp_path, quiet):
    sink, broken = _ListSink(), _BrokenSink(tmp_path / "spill")
    with StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False, sinks=[sink, broken]) as analyzer:
        res = analyzer.analyze(mse_step(), regression_loader(), 3)
        # delivered and flushed when analyze() returns, though the other sink fails
        assert [r.step for r in sink.records] == [0, 1, 2, 3] and sink.flushed_at[-1] == 4
    # the per-epoch exponent has its own key; the per-step `lyapunov` field (shadow/lyapunov) stays empty
    assert all(r.lyapunov is None and r.lyapunov_local is None for r in sink.records)
    assert "analysis/lyapunov" not in sink.records[0].extra
    assert sink.records[-1].extra["analysis/lyapunov"] == pytest.approx(res.lyapunov)
    for k, r in enumerate(sink.records):
        assert r.extra["analysis/spread"] == pytest.approx(res.spread_evolution[k])
        if k:
            assert r.extra["analysis/lyapunov_local"] == pytest.approx(res.local_lyapunov[k - 1])
            lam = math.log(res.spread_evolution[k] / res.spread_evolution[0]) / k
            assert r.extra["analysis/lyapunov"] == pytest.approx(lam)
    assert any("disk full" in d for d in res.diagnostics)
    # closed while still failing: its records stay in the spill file, for `stabwatch replay`
    (spill,) = (tmp_path / "spill").glob("_BrokenSink-*.jsonl")
    assert [r.step for r in read_jsonl(spill)] == [0, 1, 2, 3]


def test_a_sink_that_comes_back_gets_its_spilled_records_once_in_order(tmp_path, quiet):
    sink = _BrokenSink(tmp_path / "spill")
    analyzer = StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False, sinks=sink)
    res = analyzer.analyze(mse_step(), regression_loader(), 3)
    (spill,) = (tmp_path / "spill").glob("_BrokenSink-*.jsonl")
    (message,) = [d for d in res.diagnostics if "_BrokenSink" in d]
    assert "OSError: disk full" in message and str(spill) in message  # the error and where the records wait
    assert [r.step for r in read_jsonl(spill)] == [0, 1, 2, 3] and sink.records == []
    sink.down = False  # the tracker is back: the background writer retries from the spill file
    deadline = time.monotonic() + 30
    while (len(sink.records) < 4 or spill.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    analyzer.close()
    assert [r.step for r in sink.records] == [0, 1, 2, 3]  # each exactly once, in order
    for r, spread in zip(sink.records, res.spread_evolution, strict=True):
        assert r.extra["analysis/spread"] == spread
    assert not spill.exists()  # drained


def test_jsonl_sink_gets_one_record_per_checkpoint(tmp_path, quiet):
    path = tmp_path / "analysis.jsonl"
    with StabilityAnalyzer(mlp(), n_trajectories=3, verbose=False, sinks=JsonlSink(path)) as analyzer:
        res = analyzer.analyze(mse_step(), regression_loader(), 2)
        lines = path.read_text(encoding="utf-8").splitlines()  # on disk when analyze() returns
    assert len(lines) == res.n_checkpoints == 3
    records = list(read_jsonl(path))
    assert [r.step for r in records] == [0, 1, 2]
    for k, r in enumerate(records):
        assert r.extra["analysis/spread"] == res.spread_evolution[k]  # exact through JSON
    assert records[-1].extra["analysis/lyapunov"] == pytest.approx(res.lyapunov, rel=1e-12)
    again = analyzer.compute_metrics()  # after close: reported, not raised, nothing written
    assert any("closed" in d for d in again.diagnostics) and len(path.read_text().splitlines()) == 3


def test_replaying_the_analyzers_records_through_the_default_rules_raises_no_chaotic(tmp_path, quiet):
    """The analyzer's exponent is per epoch; the `chaotic` rule's threshold (0.05) is per optimizer step.

    Least squares whose two modes both expand (``1 - eta h = -1.1, -1.2`` per step, one step per epoch):
    the per-epoch exponent is about log 1.2 > 0.05 at every one of 14 checkpoints, which the rule would
    read as "chaotic" if it sat in the per-step ``lyapunov`` field (``shadow/lyapunov``).
    """
    from stabwatch.alerts import AlertEngine, default_rules
    from stabwatch.metrics import StabilityMetrics
    from stabwatch.report import load_run
    from tests.analysis.analysis_helpers import LeastSquares

    case = LeastSquares(h=np.array([2.1, 2.2]), eta=1.0, steps_per_epoch=1)
    path = tmp_path / "analysis.jsonl"
    with StabilityAnalyzer(case.model(), n_trajectories=3, verbose=False, sinks=JsonlSink(path)) as analyzer:
        res = analyzer.analyze(case.step(), case.batches, 14)
    per_epoch = [r.extra["analysis/lyapunov"] for r in read_jsonl(path) if "analysis/lyapunov" in r.extra]
    assert len(per_epoch) == 14 and min(per_epoch) > 0.05  # the case the issue describes
    assert per_epoch[-1] == pytest.approx(res.lyapunov, rel=1e-12)
    assert math.log(1.1) < res.lyapunov < math.log(1.2) + 1e-6
    # what the rules would have said with the per-epoch value in the per-step field
    misfiled = [StabilityMetrics(step=s, lyapunov=v) for s, v in enumerate(per_epoch, start=1)]
    wrong = AlertEngine(default_rules(), log_alerts=False).run(misfiled)
    assert any(a.rule == "chaotic" for a in wrong)
    # the records as written: re-running the default rules (`stabwatch report` path, and a plain engine)
    run = load_run(path, rerun_rules=True)
    assert not any(a.rule == "chaotic" for a in run.alerts)
    replayed = AlertEngine(default_rules(), log_alerts=False).run(read_jsonl(path))
    assert not any(a.rule == "chaotic" for a in replayed)
