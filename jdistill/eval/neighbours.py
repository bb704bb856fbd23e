"""Nearest-neighbour metrics in a feature space: the memorisation rate and improved precision /
recall (Kynkaenniemi et al. 2019, k-NN radii, k = 3 as in the ADM / EDM evaluators).

Distances are squared Euclidean, by matmul in JAX, in blocks of queries x chunks of points so
memory stays bounded whatever the set sizes; features live on the host between blocks.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

K = 3                      # the k of the k-NN radii (precision / recall)
QUERY_BLOCK = 1024
POINT_CHUNK = 8192
MEMORISATION_PERCENTILE = 5.0


def _squared_distances(queries, points):
  dot = jnp.matmul(queries, points.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(queries ** 2, 1)[:, None] + jnp.sum(points ** 2, 1)[None] - 2 * dot, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _smallest(queries, points, valid, start, best, k):
  """`best` (distances, indices), each (q, k), merged with the k nearest valid `points` (global
  indices from `start`)."""
  distances = jnp.where(valid[None], _squared_distances(queries, points), jnp.inf)
  indices = jnp.broadcast_to(start + jnp.arange(points.shape[0]), distances.shape)
  negative, order = jax.lax.top_k(-jnp.concatenate([best[0], distances], 1), k)
  return -negative, jnp.take_along_axis(jnp.concatenate([best[1], indices], 1), order, 1)


@jax.jit
def _exact(queries, points, indices):
  """Squared distances to the chosen points by difference (no matmul cancellation), ascending."""
  return jnp.sort(jnp.sum((queries[:, None] - points[indices]) ** 2, -1), 1)


@jax.jit
def _covered(queries, points, valid, radii, covered):
  """`covered` OR (some valid point j has |query - point_j|^2 <= radii_j)."""
  inside = (_squared_distances(queries, points) <= radii[None]) & valid[None]
  return covered | jnp.any(inside, 1)


def _padded(array, size):
  array = np.asarray(array, np.float32).reshape(len(array), -1)
  extra = -len(array) % size
  return np.concatenate([array, np.zeros((extra, array.shape[1]), np.float32)]), len(array)


def _over_queries(queries, points, initial, step, finish=None):
  """`step(query_block, point_chunk, valid, chunk_start, carry)` over every chunk of `points`,
  for each block of `queries` (carry from `initial(block_size)`); `finish(query_block, carry)`
  of each block, concatenated."""
  chunk_size, block_size = min(POINT_CHUNK, len(points)), min(QUERY_BLOCK, len(queries))
  padded_points, num_points = _padded(points, chunk_size)
  chunks = [(jnp.asarray(padded_points[s:s + chunk_size]),
             jnp.asarray(np.arange(s, s + chunk_size) < num_points), s)
            for s in range(0, len(padded_points), chunk_size)]
  finish = finish or (lambda block, carry: carry)
  padded_queries, num_queries = _padded(queries, block_size)
  out = []
  for start in range(0, len(padded_queries), block_size):
    block, carry = jnp.asarray(padded_queries[start:start + block_size]), initial(block_size)
    for chunk, valid, chunk_start in chunks:
      carry = step(block, chunk, valid, chunk_start, carry)
    out.append(np.asarray(finish(block, carry)))
  return np.concatenate(out)[:num_queries]


def nearest_squared_distances(queries, points, k: int = 1):
  """(len(queries), k): squared distances from each query to its k nearest `points`, ascending."""
  if len(points) < k:
    raise ValueError(f"{k} nearest neighbours need >= {k} points, got {len(points)}")
  all_points = jnp.asarray(np.asarray(points, np.float32).reshape(len(points), -1))
  initial = lambda size: (jnp.full((size, k), jnp.inf, jnp.float32), jnp.zeros((size, k), jnp.int32))
  step = lambda block, chunk, valid, start, best: _smallest(block, chunk, valid, start, best, k)
  return _over_queries(queries, points, initial, step,
                       lambda block, best: _exact(block, all_points, best[1]))


def knn_radii(points, k: int = K):
  """Squared distance from each point to its k-th nearest other point (the manifold's radii)."""
  return nearest_squared_distances(points, points, k + 1)[:, k]


def covered_fraction(queries, points, radii) -> float:
  """Share of `queries` within the ball of squared radius `radii[j]` around some `points[j]`."""
  radii = np.pad(np.asarray(radii, np.float32), (0, POINT_CHUNK))
  step = lambda block, chunk, valid, start, covered: _covered(
      block, chunk, valid, jnp.asarray(radii[start:start + len(chunk)]), covered)
  return float(np.mean(_over_queries(queries, points, lambda size: jnp.zeros((size,), bool), step)))


def precision_recall(real, fake, real_radii=None, k: int = K) -> dict:
  """Improved precision (share of `fake` inside the real manifold) and recall (share of `real`
  inside the fake manifold); `real_radii` may be given (cached), else computed."""
  real_radii = knn_radii(real, k) if real_radii is None else real_radii
  return {"precision": covered_fraction(fake, real, real_radii),
          "recall": covered_fraction(real, fake, knn_radii(fake, k))}


def memorisation_threshold(heldout, train, percentile: float = MEMORISATION_PERCENTILE) -> float:
  """The `percentile`-th percentile of held-out-to-training nearest squared distances."""
  return float(np.percentile(nearest_squared_distances(heldout, train)[:, 0], percentile))


def memorised_fraction(samples, train, threshold: float) -> float:
  """Share of `samples` whose nearest training example is closer than `threshold` (squared)."""
  return float(np.mean(nearest_squared_distances(samples, train)[:, 0] < threshold))
