"""Pure ES math: member seeds of an iteration, fitness shaping, update coefficients.

No torch, no MPI, no I/O: every function here is a pure function of its arguments and is
tested against hand-computed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MEMBER_SALT = 0x5EED
_PROMPT_SALT = 0xBA7C


@dataclass(frozen=True)
class Population:
    """The members of one iteration: noise seed and sign (+1, or -1 for a mirrored member)."""

    seeds: np.ndarray  # int64 [N]
    signs: np.ndarray  # int8 [N]


def member_population(
    run_seed: int, iteration: int, population: int, antithetic: bool
) -> Population:
    """Seeds of iteration `iteration`, derived from (run seed, iteration) only.

    With antithetic pairs, members 2k and 2k+1 share one seed with signs +1 and -1.
    """
    n_seeds = population // 2 if antithetic else population
    state = np.random.SeedSequence([run_seed, iteration, _MEMBER_SALT]).generate_state(
        n_seeds, dtype=np.uint64
    )
    seeds = (state >> np.uint64(1)).astype(np.int64)  # 63 bits: fits int64 and HDF5
    if antithetic:
        return Population(np.repeat(seeds, 2), np.tile(np.array([1, -1], np.int8), n_seeds))
    return Population(seeds, np.ones(population, np.int8))


def prompt_indices(run_seed: int, iteration: int, split_size: int, batch: int) -> np.ndarray:
    """Indices of the training prompts every member of `iteration` is scored on."""
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([run_seed, iteration, _PROMPT_SALT]))
    )
    return np.sort(rng.choice(split_size, size=batch, replace=False))


def zscore(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / std (population std). All-equal rewards or N = 1 give zeros."""
    r = np.asarray(rewards, dtype=np.float64)
    std = r.std()
    if r.size < 2 or std == 0.0 or not np.isfinite(std):
        return np.zeros_like(r)
    return (r - r.mean()) / std


def centered_ranks(rewards: np.ndarray) -> np.ndarray:
    """Ranks mapped linearly onto [-0.5, 0.5]; tied rewards share their average rank."""
    r = np.asarray(rewards, dtype=np.float64)
    n = r.size
    if n < 2:
        return np.zeros_like(r)
    order = np.argsort(r, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    for value in np.unique(r):  # average the ranks of ties
        tied = r == value
        ranks[tied] = ranks[tied].mean()
    return ranks / (n - 1) - 0.5


def top_pairs_zscore(rewards: np.ndarray, top_pairs: int) -> np.ndarray:
    """Mirrored pairs (members 2k, 2k+1): keep the `top_pairs` pairs with the highest
    max(r+, r-), z-score the rewards of the kept pairs, zero for the others (the top-b
    directions of Augmented Random Search, Mania et al. 2018). Ties keep the lower index."""
    r = np.asarray(rewards, dtype=np.float64)
    best = r.reshape(-1, 2).max(axis=1)
    kept = np.sort(np.argsort(-best, kind="stable")[:top_pairs])
    members = np.stack([2 * kept, 2 * kept + 1], axis=1).reshape(-1)
    shaped = np.zeros_like(r)
    shaped[members] = zscore(r[members])
    return shaped


SHAPERS = {"zscore": zscore, "centered_rank": centered_ranks}


def shape_rewards(rewards: np.ndarray, method: str, top_pairs: int = 0) -> np.ndarray:
    if method == "top_pairs":
        return top_pairs_zscore(rewards, top_pairs)
    return SHAPERS[method](rewards)


def update_coefficients(
    population: Population, shaped: np.ndarray, alpha: float
) -> list[tuple[int, float]]:
    """(seed, coefficient) pairs such that the update is sum_k coef_k * eps(seed_k).

    theta += alpha/N * sum_n shaped_n * sign_n * eps(seed_n); mirrored members share a seed,
    so their terms are merged. Order follows member index, so every rank sums identically.
    Seeds whose coefficient is exactly zero are dropped: their noise need not be generated.
    """
    n = len(population.seeds)
    coefs: dict[int, float] = {}
    for seed, sign, weight in zip(
        population.seeds.tolist(), population.signs.tolist(), shaped.tolist(), strict=True
    ):
        coefs[seed] = coefs.get(seed, 0.0) + alpha / n * sign * weight
    return [(seed, c) for seed, c in coefs.items() if c != 0.0]


def scheduled(
    value: float, schedule: str, final: float, decay_iterations: int, iteration: int
) -> float:
    """alpha or sigma of `iteration`: value x a factor from 1 (iteration 0) down to `final`
    (iteration >= decay_iterations), linear or half-cosine; constant returns value."""
    if schedule == "constant":
        return value
    progress = min(iteration / decay_iterations, 1.0)
    if schedule == "linear":
        fall = progress
    elif schedule == "cosine":
        fall = (1.0 - math.cos(math.pi * progress)) / 2.0
    else:
        raise ValueError(f"unknown schedule '{schedule}'")
    return value * (1.0 - (1.0 - final) * fall)


def replace_nonfinite(rewards: np.ndarray) -> np.ndarray:
    """NaN / +-inf rewards replaced by the lowest finite reward (0.0 if none is finite)."""
    r = np.asarray(rewards, dtype=np.float64)
    finite = np.isfinite(r)
    worst = float(r[finite].min()) if finite.any() else 0.0
    return np.where(finite, r, worst)
