"""The Chinchilla fit recovers known laws from synthetic runs, and the frontier is the argmin.

Tolerances (stated in docs/scaling.md): noise-free data on a 6 x 6 grid of N in [1e7, 1e10] and
D in [1e9, 1e12] gives every parameter to 1e-4 (relative); with 0.3% multiplicative noise,
alpha and beta within 0.02, E within 0.03 and the frontier exponent N_opt ~ C^a within 0.02.
"""

import math

import numpy as np
import pytest

from megatron_transmamba.scaling.fit import (FlopsPerToken, LossLaw, bootstrap_laws, compute_optimal,
                                             fit_family, fit_loss_law, frontier_exponents)

CHINCHILLA = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def grid(n=6):
    N, D = np.meshgrid(np.logspace(7, 10, n), np.logspace(9, 12, n))
    return N.ravel(), D.ravel()


def test_noise_free_runs_give_the_law_back():
    N, D = grid()
    fit = fit_loss_law(N, D, CHINCHILLA(N, D))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-4), name
    assert fit.rmse_log < 1e-8


def test_noisy_runs_give_the_law_back_within_tolerance():
    N, D = grid()
    L = CHINCHILLA(N, D) * np.exp(np.random.default_rng(1).normal(0, 0.003, N.shape))
    law = fit_loss_law(N, D, L).law
    assert abs(law.alpha - 0.34) < 0.02 and abs(law.beta - 0.28) < 0.02, law
    assert abs(law.E - 1.69) < 0.03, law
    cost = FlopsPerToken(k=6.0, gamma=1.0)
    assert abs(frontier_exponents(law, cost)[0] - frontier_exponents(CHINCHILLA, cost)[0]) < 0.02


def test_bootstrap_intervals_cover_the_true_exponents():
    N, D = grid(5)
    L = CHINCHILLA(N, D) * np.exp(np.random.default_rng(2).normal(0, 0.003, N.shape))
    best = fit_loss_law(N, D, L).law
    laws = bootstrap_laws(N, D, L, best, n=12, seed=0)
    for name, truth in (("alpha", 0.34), ("beta", 0.28)):
        values = np.array([getattr(x, name) for x in laws])
        assert values.std() > 0, name
        assert values.min() - 0.01 <= truth <= values.max() + 0.01, (name, values)


def test_frontier_is_the_argmin_and_the_6nd_closed_form():
    cost = FlopsPerToken(k=6.0, gamma=1.0)
    C = np.array([1e19, 1e21, 1e23])
    opt = compute_optimal(CHINCHILLA, cost, C)
    a, b = frontier_exponents(CHINCHILLA, cost)
    assert a == pytest.approx(0.28 / 0.62) and b == pytest.approx(0.34 / 0.62)
    G = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / 0.62)
    np.testing.assert_allclose(opt["params"], G * (C / 6) ** a, rtol=1e-12)
    np.testing.assert_allclose(opt["params"] * opt["tokens"] * 6, C, rtol=1e-12)
    # brute force over N, with a cost that is not 6N (gamma != 1, as attention terms make it)
    cost = FlopsPerToken(k=9.0, gamma=0.95)
    for c in C:
        Ns = np.logspace(6, 13, 200001)
        brute = Ns[np.argmin(CHINCHILLA(Ns, c / cost(Ns)))]
        got = compute_optimal(CHINCHILLA, cost, c)["params"]
        assert got == pytest.approx(brute, rel=1e-3)


def test_flops_per_token_fit_is_exact_for_a_power_law():
    N = np.array([1e6, 3e6, 1e7])
    cost = FlopsPerToken.fit(N, 7.5 * N ** 1.02)
    assert cost.k == pytest.approx(7.5) and cost.gamma == pytest.approx(1.02)


def test_fit_family_on_rows_and_too_few_runs_are_skipped():
    N, D = grid(3)
    rows = [{"status": "done", "params": n, "tokens": d, "valid_loss": float(CHINCHILLA(n, d)),
             "flops": 6 * n * d, "flops_per_token": 6 * n} for n, d in zip(N, D)]
    out = fit_family(rows, n_bootstrap=3)
    assert out["n_runs"] == 9 and out["law"]["alpha"] == pytest.approx(0.34, rel=1e-3)
    assert out["flops_per_token"] == {"k": pytest.approx(6.0), "gamma": pytest.approx(1.0)}
    assert out["frontier"]["params_exponent"] == pytest.approx(0.28 / 0.62, rel=1e-3)
    point = out["frontier"]["points"][0]
    assert point["params_lo"] <= point["params"] * 1.001 and point["params"] <= point["params_hi"] * 1.001
    assert set(out["bootstrap"]["ci95"]) == {"E", "A", "B", "alpha", "beta"}
    assert all(math.isfinite(v) for v in out["bootstrap"]["std"].values())
    rows[0]["status"] = "failed"
    assert "skipped" in fit_family(rows[:5])
