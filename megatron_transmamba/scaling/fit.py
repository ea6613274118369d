"""Chinchilla loss laws per model family, their bootstrap uncertainty, and the compute-optimal
frontier (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", approach 3).

Law: L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D training tokens). Fit, as in the
paper: with A = e^a, B = e^b, E = e^e, minimise over (a, b, e, alpha, beta)

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  delta = 1e-3,

by L-BFGS from the best ``top_k`` points of the paper's grid of initialisations (alpha, beta in
{0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1.5}, a, b in {0, 5, ..., 25}: the objective is evaluated on
the whole grid first, which is cheap). Uncertainty: refit on runs resampled with replacement
(bootstrap over runs) and report standard deviations and 95% percentile intervals.

Frontier: C = c(N) D, where c(N) = k N^gamma is the family's training FLOPs per token fitted over
its sizes (``megatron_transmamba.flops``; gamma = 1 and k = 6 is the 6ND rule). Minimising
L(N, C / c(N)) over N gives, in closed form,

    N_opt(C) = (alpha A / (gamma beta B))^(1 / (alpha + gamma beta)) (C / k)^(beta / (alpha + gamma beta))
    D_opt(C) = C / c(N_opt(C))  ~  C^(alpha / (alpha + gamma beta)).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

HUBER_DELTA = 1e-3
MIN_RUNS = 5
"""A family needs at least this many finished runs (the law has 5 parameters)."""

_GRID = np.array(list(itertools.product(
    np.arange(0, 30, 5.0), np.arange(0, 30, 5.0), np.arange(-1, 2, 0.5),
    np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))))           # (a, b, e, alpha, beta)
_BOUNDS = [(-20, 80), (-20, 80), (-10, 5), (0, 5), (0, 5)]


@dataclass(frozen=True)
class LossLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * N ** -self.alpha + self.B * D ** -self.beta

    @classmethod
    def from_vector(cls, x) -> "LossLaw":
        a, b, e, alpha, beta = (float(v) for v in x)
        return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)

    def vector(self) -> np.ndarray:
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FlopsPerToken:
    """c(N) = k N^gamma: training FLOPs per token as a function of the parameter count."""

    k: float
    gamma: float

    def __call__(self, N):
        return self.k * np.asarray(N, dtype=float) ** self.gamma

    @classmethod
    def fit(cls, params, flops_per_token) -> "FlopsPerToken":
        """Least squares in log-log space; one size gives gamma = 1."""
        logN, logc = np.log(np.asarray(params, float)), np.log(np.asarray(flops_per_token, float))
        if np.ptp(logN) < 1e-9:
            return cls(k=float(np.exp(np.mean(logc - logN))), gamma=1.0)
        gamma, logk = np.polyfit(logN, logc, 1)
        return cls(k=float(np.exp(logk)), gamma=float(gamma))


def _terms(x: np.ndarray, logN: np.ndarray, logD: np.ndarray) -> np.ndarray:
    """[..., 3, n] log of the three terms, for parameter vectors x [..., 5]."""
    a, b, e, alpha, beta = (x[..., i, None] for i in range(5))
    return np.stack([a - alpha * logN, b - beta * logD, np.broadcast_to(e, a.shape[:-1] + logN.shape)], -2)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)) / delta


def _objective(x, logN, logD, logL, delta):
    """Huber objective / delta and its gradient; written out term by term because the
    optimiser calls it thousands of times on a few dozen runs (numpy call overhead dominates)."""
    a, b, e, alpha, beta = x
    t0, t1 = a - alpha * logN, b - beta * logD
    m = np.maximum(np.maximum(t0, t1), e)
    w0, w1, w2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    s = w0 + w1 + w2
    r = m + np.log(s) - logL
    u = r / delta
    abs_u = np.abs(u)
    value = np.where(abs_u <= 1.0, 0.5 * u * r, np.abs(r) - 0.5 * delta).sum()
    dr = np.clip(u, -1.0, 1.0) / s                               # Huber' / delta, over the LSE's sum
    g0, g1 = dr * w0, dr * w1
    grad = np.array([g0.sum(), g1.sum(), dr.dot(w2), -g0.dot(logN), -g1.dot(logD)])
    return value, grad


def _grid_objective(X, logN, logD, logL, delta):
    t = _terms(X, logN, logD)                                    # [K, 3, n]
    m = t.max(-2)
    r = m + np.log(np.exp(t - m[..., None, :]).sum(-2)) - logL
    return _huber(r, delta).sum(-1)


@dataclass(frozen=True)
class LawFit:
    law: LossLaw
    objective: float
    """The Huber objective at the optimum (divided by delta)."""
    rmse_log: float
    """Root mean square of log L_fit - log L over the runs."""


def fit_loss_law(N, D, L, delta: float = HUBER_DELTA, top_k: int = 8, inits=None,
                 max_iterations: int = 1000) -> LawFit:
    """Fit L(N, D) by the Huber objective from the best ``top_k`` grid points (and ``inits``,
    extra starting vectors (a, b, e, alpha, beta))."""
    logN, logD, logL = (np.log(np.asarray(v, dtype=float)) for v in (N, D, L))
    if not (len(logN) == len(logD) == len(logL)) or not np.isfinite(logN + logD + logL).all():
        raise ValueError("fit_loss_law: N, D, L need equal lengths of positive finite values")
    starts = _GRID[np.argsort(_grid_objective(_GRID, logN, logD, logL, delta))[:top_k]]
    if inits is not None:
        starts = np.concatenate([np.atleast_2d(np.asarray(inits, float)), starts])
    best = None
    for x0 in starts:
        x0 = np.clip(x0, [lo for lo, _ in _BOUNDS], [hi for _, hi in _BOUNDS])
        res = minimize(_objective, x0, args=(logN, logD, logL, delta), jac=True, method="L-BFGS-B",
                       bounds=_BOUNDS, options={"maxiter": max_iterations, "ftol": 1e-13, "gtol": 1e-9})
        if best is None or res.fun < best.fun:
            best = res
    law = LossLaw.from_vector(best.x)
    rmse = float(np.sqrt(np.mean((np.log(law(np.exp(logN), np.exp(logD))) - logL) ** 2)))
    return LawFit(law=law, objective=float(best.fun), rmse_log=rmse)


def bootstrap_laws(N, D, L, best: LossLaw, n: int, seed: int = 0, top_k: int = 2) -> list[LossLaw]:
    """Refit on ``n`` resamples of the runs (with replacement), started from ``best`` and the
    resample's best ``top_k`` grid points."""
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    rng = np.random.default_rng(seed)
    laws = []
    for _ in range(n):
        idx = rng.integers(0, len(N), len(N))
        laws.append(fit_loss_law(N[idx], D[idx], L[idx], top_k=top_k, inits=best.vector(),
                                 max_iterations=400).law)
    return laws


def optimal_params(law: LossLaw, cost: FlopsPerToken, C) -> np.ndarray:
    """N_opt(C) = argmin_N L(N, C / c(N)) (closed form, module docstring)."""
    s = law.alpha + cost.gamma * law.beta
    ratio = law.alpha * law.A / (cost.gamma * law.beta * law.B)
    return ratio ** (1.0 / s) * (np.asarray(C, float) / cost.k) ** (law.beta / s)


def frontier_exponents(law: LossLaw, cost: FlopsPerToken) -> tuple[float, float]:
    """(a, b) with N_opt ~ C^a and D_opt ~ C^b."""
    s = law.alpha + cost.gamma * law.beta
    return law.beta / s, 1.0 - cost.gamma * law.beta / s


def compute_optimal(law: LossLaw, cost: FlopsPerToken, C) -> dict:
    """N_opt, D_opt and the loss on the frontier at compute C (arrays)."""
    C = np.asarray(C, dtype=float)
    N = optimal_params(law, cost, C)
    D = C / cost(N)
    return {"flops": C, "params": N, "tokens": D, "loss": law(N, D)}


def _percentiles(values: np.ndarray) -> list:
    return [float(v) for v in np.nanpercentile(values, [2.5, 97.5], axis=0).tolist()] \
        if values.ndim == 1 else np.nanpercentile(values, [2.5, 97.5], axis=0).tolist()


def fit_family(rows: list[dict], loss_column: str = "valid_loss", params_column: str = "params",
               n_bootstrap: int = 100, seed: int = 0, frontier_points: int = 25) -> dict:
    """Law, bootstrap and frontier of one family's finished runs (rows of results.csv)."""
    done = [r for r in rows if r["status"] == "done" and np.isfinite(r[loss_column])
            and r[loss_column] > 0]
    if len(done) < MIN_RUNS:
        return {"skipped": f"needs at least {MIN_RUNS} finished runs with a {loss_column}, has {len(done)}",
                "n_runs": len(done)}
    N = np.array([r[params_column] for r in done], float)
    D = np.array([r["tokens"] for r in done], float)
    L = np.array([r[loss_column] for r in done], float)
    C = np.array([r["flops"] for r in done], float)
    sizes = {}
    for r in done:
        sizes[r[params_column]] = r["flops_per_token"]
    cost = FlopsPerToken.fit(list(sizes), list(sizes.values()))
    fit = fit_loss_law(N, D, L)
    law = fit.law
    grid = np.logspace(math.log10(C.min()) - 0.5, math.log10(C.max()) + 1.0, frontier_points)
    frontier = compute_optimal(law, cost, grid)
    a, b = frontier_exponents(law, cost)
    out = {
        "n_runs": len(done), "law": law.to_dict(), "huber_objective": fit.objective,
        "rmse_log": fit.rmse_log, "flops_per_token": asdict(cost),
        "data": {"params": N.tolist(), "tokens": D.tolist(), "loss": L.tolist(), "flops": C.tolist()},
        "frontier": {"params_exponent": a, "tokens_exponent": b,
                     "points": [{k: float(v[i]) for k, v in frontier.items()} for i in range(len(grid))]},
    }
    if n_bootstrap > 0:
        laws = bootstrap_laws(N, D, L, law, n_bootstrap, seed)
        table = np.array([[getattr(x, k) for k in ("E", "A", "B", "alpha", "beta")] for x in laws])
        exps = np.array([frontier_exponents(x, cost) for x in laws])
        n_opt = np.array([optimal_params(x, cost, grid) for x in laws])
        with np.errstate(all="ignore"):
            d_opt = grid / cost(n_opt)
        out["bootstrap"] = {
            "n": n_bootstrap, "seed": seed,
            "std": {k: float(np.nanstd(table[:, i])) for i, k in enumerate(("E", "A", "B", "alpha", "beta"))},
            "ci95": {k: _percentiles(table[:, i]) for i, k in enumerate(("E", "A", "B", "alpha", "beta"))},
            "params_exponent_ci95": _percentiles(exps[:, 0]),
            "tokens_exponent_ci95": _percentiles(exps[:, 1]),
        }
        lo_n, hi_n = np.nanpercentile(n_opt, [2.5, 97.5], axis=0)
        lo_d, hi_d = np.nanpercentile(d_opt, [2.5, 97.5], axis=0)
        for i, point in enumerate(out["frontier"]["points"]):
            point.update(params_lo=float(lo_n[i]), params_hi=float(hi_n[i]),
                         tokens_lo=float(lo_d[i]), tokens_hi=float(hi_d[i]))
    return out


def fit_sweep(rows: list[dict], loss_column: str = "valid_loss", params_column: str = "params",
              n_bootstrap: int = 100, seed: int = 0) -> dict:
    """``fit_family`` for every family in the rows (in order of first appearance)."""
    families = list(dict.fromkeys(r["family"] for r in rows))
    return {
        "law": "L(N, D) = E + A / N^alpha + B / D^beta",
        "loss_column": loss_column, "params_column": params_column, "huber_delta": HUBER_DELTA,
        "families": {f: fit_family([r for r in rows if r["family"] == f], loss_column, params_column,
                                   n_bootstrap, seed) for f in families},
    }
