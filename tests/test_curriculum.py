"""Adaptive timestep curriculum against hand-computed values and a chi-square test."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.curriculum import AdaptiveCurriculumScheduler, CurriculumState, TimestepDivergenceTracker


def test_divergence_update_against_hand_computation():
  tracker = TimestepDivergenceTracker(num_regions=3, smoothing=0.9)
  t = jnp.array([0.1, 0.2, 0.5, 0.99])            # regions 0, 0, 1, 2
  loss = jnp.array([1.0, 3.0, 4.0, 10.0])
  divergence, counts = tracker.update(jnp.array([1.0, 1.0, 1.0]), t, loss)
  np.testing.assert_allclose(divergence, [0.9 + 0.1 * 2.0, 0.9 + 0.1 * 4.0, 0.9 + 0.1 * 10.0], rtol=1e-6)
  np.testing.assert_allclose(counts, [2, 1, 1])
  # a region the batch does not visit keeps its divergence
  divergence, _ = tracker.update(jnp.array([5.0, 6.0, 7.0]), jnp.array([0.1]), jnp.array([1.0]))
  np.testing.assert_allclose(divergence, [0.9 * 5 + 0.1, 6.0, 7.0], rtol=1e-6)


def test_probabilities_against_hand_computation_and_floor():
  scheduler = AdaptiveCurriculumScheduler(TimestepDivergenceTracker(3), temperature=2.0,
                                          min_weight=0.1)
  p = scheduler.probabilities(jnp.array([1.0, 2.0, 3.0]))
  powered = np.array([1.0, 4.0, 9.0])
  np.testing.assert_allclose(p, 0.1 + 0.7 * powered / powered.sum(), rtol=1e-6)
  assert abs(float(p.sum()) - 1.0) < 1e-6
  extreme = scheduler.probabilities(jnp.array([1e-9, 1e-9, 1e6]))
  assert float(extreme.min()) >= 0.1 - 1e-7 and abs(float(extreme.sum()) - 1) < 1e-6
  with pytest.raises(ValueError, match="min_weight"):
    AdaptiveCurriculumScheduler(TimestepDivergenceTracker(3), min_weight=0.5)


def test_probabilities_refresh_only_every_update_every_steps():
  scheduler = AdaptiveCurriculumScheduler(TimestepDivergenceTracker(3, 0.0), update_every=4)
  state = scheduler.init()
  t, loss = jnp.array([0.1, 0.5, 0.9]), jnp.array([1.0, 1.0, 8.0])
  for step in range(3):
    state = scheduler.update(state, step, t, loss)
    np.testing.assert_allclose(state.probabilities, 1 / 3)
  state = scheduler.update(state, 3, t, loss)
  np.testing.assert_allclose(state.probabilities, 0.1 + 0.7 * np.array([1, 1, 8]) / 10, rtol=1e-6)


def test_sampled_timesteps_follow_region_probabilities_chi_square():
  scheduler = AdaptiveCurriculumScheduler(TimestepDivergenceTracker(3))
  state = CurriculumState(jnp.ones(3), jnp.array([0.2, 0.5, 0.3]), jnp.zeros(3))
  n = 30000
  u, w = scheduler.sample(state, jax.random.key(0), n)
  counts = np.bincount(np.asarray(scheduler.tracker.region_of(u)), minlength=3)
  expected = n * np.array([0.2, 0.5, 0.3])
  chi2 = float(np.sum((counts - expected) ** 2 / expected))
  assert chi2 < 13.8          # chi-square, 2 dof, p = 0.001
  # importance weights undo the bias: E_q[w f(u)] = E_uniform[f(u)] for f(u) = u^2 (= 1/3)
  np.testing.assert_allclose(float(jnp.mean(w * u**2)), 1 / 3, atol=0.01)


def test_discrete_weights_are_unbiased_for_every_step_count():
  scheduler = AdaptiveCurriculumScheduler(TimestepDivergenceTracker(3))
  state = CurriculumState(jnp.ones(3), jnp.array([0.15, 0.6, 0.25]), jnp.zeros(3))
  for num_steps in (1, 2, 4, 7, 64):
    index = jnp.arange(num_steps)
    w = scheduler.discrete_weight(state, index, num_steps)
    # P(i) * w(i) = 1/N for every index: the weighted discrete distribution is uniform
    lo, hi = np.arange(num_steps) / num_steps, (np.arange(num_steps) + 1) / num_steps
    mass = np.zeros(num_steps)
    for r, p in enumerate([0.15, 0.6, 0.25]):
      a, b = r / 3, (r + 1) / 3
      mass += p * 3 * np.clip(np.minimum(hi, b) - np.maximum(lo, a), 0, None)
    np.testing.assert_allclose(np.asarray(w) * mass, 1 / num_steps, rtol=1e-5)
