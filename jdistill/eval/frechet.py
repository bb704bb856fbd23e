"""Frechet distance between Gaussians fitted to two feature sets, and sliced Wasserstein (2-D).

FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2)
"""
from __future__ import annotations

import numpy as np


def gaussian_stats(features):
  features = np.asarray(features, np.float64)
  return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
  cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
  values, vectors = np.linalg.eigh(cov1)
  sqrt_cov1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  middle = sqrt_cov1 @ cov2 @ sqrt_cov1
  trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance(features1, features2) -> float:
  return frechet_distance_from_stats(*gaussian_stats(features1), *gaussian_stats(features2))


def sliced_wasserstein(a, b, num_projections: int = 256, seed: int = 0) -> float:
  """Mean over random directions of the 1-D Wasserstein-1 distance (equal-size quantile match)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = min(len(a), len(b))
  rng = np.random.RandomState(seed)
  directions = rng.randn(a.shape[1], num_projections)
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  pa = np.sort((a[rng.permutation(len(a))[:n]]) @ directions, axis=0)
  pb = np.sort((b[rng.permutation(len(b))[:n]]) @ directions, axis=0)
  return float(np.mean(np.abs(pa - pb)))
