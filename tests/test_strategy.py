"""Pure ES math against hand-computed values."""

import numpy as np
import pytest

from es_mpi.comm import deal_members
from es_mpi.stopping import out_of_time
from es_mpi.strategy import (
    Population,
    centered_ranks,
    member_population,
    prompt_indices,
    scheduled,
    shape_rewards,
    update_coefficients,
    zscore,
)


def test_zscore_hand_computed():
    # mean 2, population std sqrt(2/3)
    expected = np.array([-1.0, 0.0, 1.0]) / np.sqrt(2 / 3)
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0])), expected)


def test_centered_ranks_hand_computed():
    np.testing.assert_allclose(centered_ranks(np.array([10.0, -3.0, 7.0])), [0.5, -0.5, 0.0])
    # ties share their average rank: ranks 0, 1.5, 1.5, 3 over 3
    np.testing.assert_allclose(
        centered_ranks(np.array([1.0, 5.0, 5.0, 9.0])), [-0.5, 0.0, 0.0, 0.5]
    )


@pytest.mark.parametrize("shaper", [zscore, centered_ranks])
@pytest.mark.parametrize("rewards", [[0.7], [0.3, 0.3, 0.3, 0.3], [0.0] * 7])
def test_degenerate_rewards_give_zeros(shaper, rewards):
    out = shaper(np.array(rewards))
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)


def test_member_seeds_depend_on_seed_and_iteration_only():
    a = member_population(7, 3, 10, antithetic=False)
    b = member_population(7, 3, 10, antithetic=False)
    np.testing.assert_array_equal(a.seeds, b.seeds)
    assert len(set(a.seeds.tolist())) == 10
    assert not np.array_equal(a.seeds, member_population(7, 4, 10, False).seeds)
    assert not np.array_equal(a.seeds, member_population(8, 3, 10, False).seeds)


def test_antithetic_pairs_share_seeds_with_opposite_signs():
    pop = member_population(0, 0, 6, antithetic=True)
    np.testing.assert_array_equal(pop.seeds[0::2], pop.seeds[1::2])
    np.testing.assert_array_equal(pop.signs, [1, -1, 1, -1, 1, -1])


def test_update_coefficients_hand_computed():
    pop = Population(np.array([11, 11, 22, 22]), np.array([1, -1, 1, -1], np.int8))
    coefs = update_coefficients(pop, np.array([1.0, -1.0, 0.5, 0.5]), alpha=0.4)
    # alpha/N = 0.1: seed 11 -> 0.1*(1*1 + -1*-1) = 0.2; seed 22 -> 0.1*(0.5 - 0.5) = 0, dropped
    assert coefs == [(11, pytest.approx(0.2))]


def test_top_pairs_hand_computed():
    # pair maxima 1, 3, 0.5: pairs 0 and 1 kept; their rewards 1 0 3 2 have mean 1.5 and
    # population std sqrt(1.25); pair 2 gets 0
    rewards = np.array([1.0, 0.0, 3.0, 2.0, 0.5, 0.5])
    expected = np.array([-0.5, -1.5, 1.5, 0.5, 0.0, 0.0]) / np.sqrt(1.25)
    np.testing.assert_allclose(shape_rewards(rewards, "top_pairs", top_pairs=2), expected)
    # all pairs kept: plain z-scores
    np.testing.assert_allclose(shape_rewards(rewards, "top_pairs", 3), zscore(rewards))


@pytest.mark.parametrize(
    ("schedule", "iteration", "expected"),
    [
        ("constant", 7, 0.4),
        ("linear", 0, 0.4),
        ("linear", 5, 0.4 * (1 - 0.75 * 0.5)),  # halfway: factor 1 - (1 - 0.25) / 2
        ("linear", 10, 0.1),
        ("linear", 25, 0.1),  # stays at the final factor after the horizon
        ("cosine", 0, 0.4),
        ("cosine", 5, 0.4 * (1 - 0.75 * 0.5)),  # cos(pi/2) = 0: same midpoint as linear
        ("cosine", 10, 0.1),
        ("cosine", 99, 0.1),
    ],
)
def test_scheduled_hand_computed(schedule, iteration, expected):
    assert scheduled(0.4, schedule, 0.25, 10, iteration) == pytest.approx(expected)


def test_cosine_schedule_decays_slower_than_linear_early():
    assert scheduled(1.0, "cosine", 0.0, 10, 2) > scheduled(1.0, "linear", 0.0, 10, 2)


def test_prompt_indices_distinct_and_reproducible():
    idx = prompt_indices(1, 2, 100, 16)
    assert len(set(idx.tolist())) == 16 and idx.max() < 100
    np.testing.assert_array_equal(idx, prompt_indices(1, 2, 100, 16))


@pytest.mark.parametrize("population", [1, 5, 7, 30, 31])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 40])
@pytest.mark.parametrize("group", [1, 2])
def test_every_member_dealt_to_exactly_one_rank(population, world, group):
    dealt = [n for r in range(world) for n in deal_members(population, world, r, group)]
    assert sorted(dealt) == list(range(population))
    for r in range(world):  # whole groups only, except the population's last partial group
        members = deal_members(population, world, r, group)
        assert len(members) == 0 or members.start % group == 0


@pytest.mark.parametrize(
    "elapsed, loop_seconds, expected",
    [
        (0.0, [], False),  # a session's first iteration always runs
        (100.0, [], False),
        (50.0, [10.0], False),  # ends at 60 s: fits exactly
        (50.1, [10.0], True),
        (40.0, [5.0, 21.0, 5.0], True),  # the longest recent iteration (a held-out one) counts
        (40.0, [21.0] + [5.0] * 20, False),  # ... within the last 20
    ],
)
def test_time_limit_stops_before_an_iteration_that_would_end_past_it(
    elapsed, loop_seconds, expected
):
    assert out_of_time(elapsed, loop_seconds, limit_seconds=60.0) is expected
