"""Timestep samplers: uniform, or an adaptive curriculum that spends training where the student
lags the teacher most.

t in [0, 1) is split into R equal regions (default 3: early / mid / late noise).

- `TimestepDivergenceTracker`: an exponentially smoothed student-teacher divergence per region,
  d_r <- beta d_r + (1 - beta) mean{loss_i : t_i in region r} for the regions a batch visits.
- `AdaptiveCurriculumScheduler`: every `update_every` steps the region probabilities become
  p_r = m + (1 - R m) d_r^tau / sum_j d_j^tau   (floored at m = min_weight, summing to 1),
  and timesteps are drawn from that piecewise-uniform mixture. The importance weight
  w(t) = 1 / (R p_r(t)) (uniform density over the mixture's) keeps the objective unbiased.

All of it is pure jnp on a small pytree (`CurriculumState`) carried in the train state, so it is
updated inside the jitted step (no host round trip) and checkpointed with it.
"""
from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from jdistill.errors import check_choice

SAMPLERS = ("uniform", "adaptive")


@flax.struct.dataclass
class CurriculumState:
  divergence: jnp.ndarray      # (R,) smoothed per-region divergence
  probabilities: jnp.ndarray   # (R,) current sampling probabilities
  visits: jnp.ndarray          # (R,) examples seen per region (diagnostic)


@dataclasses.dataclass(frozen=True)
class TimestepDivergenceTracker:
  num_regions: int = 3
  smoothing: float = 0.9         # beta

  def region_of(self, t):
    return jnp.clip(jnp.floor(t * self.num_regions).astype(jnp.int32), 0, self.num_regions - 1)

  def update(self, divergence, t, per_example_loss):
    """New smoothed divergences after one batch of (t_i, loss_i)."""
    one_hot = jax.nn.one_hot(self.region_of(t), self.num_regions)            # (B, R)
    counts = one_hot.sum(0)
    batch_mean = (one_hot * per_example_loss[:, None]).sum(0) / jnp.maximum(counts, 1.0)
    smoothed = self.smoothing * divergence + (1.0 - self.smoothing) * batch_mean
    return jnp.where(counts > 0, smoothed, divergence), counts


@dataclasses.dataclass(frozen=True)
class AdaptiveCurriculumScheduler:
  tracker: TimestepDivergenceTracker = TimestepDivergenceTracker()
  temperature: float = 1.0
  min_weight: float = 0.1
  update_every: int = 100
  importance_weighting: bool = True

  def __post_init__(self):
    if not 0.0 <= self.min_weight * self.tracker.num_regions <= 1.0:
      raise ValueError(f"config.curriculum.min_weight={self.min_weight} must be in "
                       f"[0, 1 / num_regions = {1 / self.tracker.num_regions:.3g}]")

  @property
  def num_regions(self):
    return self.tracker.num_regions

  def init(self) -> CurriculumState:
    r = self.num_regions
    return CurriculumState(divergence=jnp.ones((r,)), probabilities=jnp.full((r,), 1.0 / r),
                           visits=jnp.zeros((r,)))

  def probabilities(self, divergence):
    """p_r = m + (1 - R m) d_r^tau / sum_j d_j^tau."""
    powered = jnp.power(jnp.maximum(divergence, 1e-12), self.temperature)
    return self.min_weight + (1.0 - self.num_regions * self.min_weight) * powered / powered.sum()

  def update(self, state: CurriculumState, step, t, per_example_loss) -> CurriculumState:
    """Track this batch; refresh the probabilities every `update_every` steps (step counts from 0)."""
    divergence, counts = self.tracker.update(state.divergence, t, per_example_loss)
    refresh = (step + 1) % self.update_every == 0
    probabilities = jnp.where(refresh, self.probabilities(divergence), state.probabilities)
    return CurriculumState(divergence, probabilities, state.visits + counts)

  def sample(self, state: CurriculumState, rng, batch: int):
    """(u, importance weight): u ~ the region mixture on [0, 1), w = 1 / (R p_region(u))."""
    rng_region, rng_within = jax.random.split(rng)
    region = jax.random.categorical(rng_region, jnp.log(state.probabilities), shape=(batch,))
    u = (region + jax.random.uniform(rng_within, (batch,))) / self.num_regions
    u = jnp.minimum(u, 1.0 - 1e-7)
    return u, self.weight(state, u)

  def weight(self, state, u):
    if not self.importance_weighting:
      return jnp.ones_like(u)
    return 1.0 / (self.num_regions * state.probabilities[self.tracker.region_of(u)])

  def discrete_weight(self, state, index, num_steps):
    """Importance weight of a discrete index i = floor(u N) drawn through `sample`:
    (1/N) / P(i), with P(i) the mixture's mass on [i/N, (i+1)/N)."""
    n = jnp.asarray(num_steps, jnp.float32)
    return self.interval_weight(state, index / n, (index + 1) / n, num_steps)

  def interval_weight(self, state, lo, hi, num_steps):
    """Importance weight of the interval [lo, hi) of an N-interval grid, picked by the u drawn
    through `sample`: (1/N) / the mixture's mass on [lo, hi)."""
    if not self.importance_weighting:
      return jnp.ones(lo.shape)
    r = self.num_regions
    n = jnp.asarray(num_steps, jnp.float32)
    edges = jnp.arange(r + 1) / r
    overlap = jnp.clip(jnp.minimum(hi[:, None], edges[None, 1:]) -
                       jnp.maximum(lo[:, None], edges[None, :-1]), 0.0, None)    # (B, R)
    mass = (overlap * state.probabilities[None] * r).sum(-1)
    return (1.0 / n) / mass


def attach(scheduler, train_state):
  """`train_state` with a fresh curriculum state (unchanged when the sampler is uniform)."""
  return train_state if scheduler is None else train_state.replace(curriculum=scheduler.init())


def advance(scheduler, old_state, new_state, t, per_example_loss, step_metrics):
  """`new_state` with the curriculum updated from this batch's (t, loss), its divergences and
  probabilities added to `step_metrics` (unchanged when the sampler is uniform)."""
  if scheduler is None:
    return new_state
  curriculum = scheduler.update(old_state.curriculum, old_state.step, t, per_example_loss)
  step_metrics.update(metrics(curriculum))
  return new_state.replace(curriculum=curriculum)


def metrics(state: CurriculumState):
  """Per-region divergences and probabilities, for TensorBoard."""
  out = {}
  for r in range(state.divergence.shape[0]):
    out[f"curriculum/divergence_{r}"] = state.divergence[r]
    out[f"curriculum/probability_{r}"] = state.probabilities[r]
  return out


def make_scheduler(config):
  """None for `config.curriculum.sampler == 'uniform'`, else an AdaptiveCurriculumScheduler."""
  c = config.curriculum
  check_choice("curriculum.sampler", c.sampler, SAMPLERS)
  if c.sampler == "uniform":
    return None
  return AdaptiveCurriculumScheduler(
      TimestepDivergenceTracker(c.num_regions, c.smoothing), c.temperature, c.min_weight,
      c.update_every, c.importance_weighting)
