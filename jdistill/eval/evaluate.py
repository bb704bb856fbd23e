"""Sampling and evaluation (Frechet distance, memorisation, precision / recall, FD to the teacher),
shared by every method and the sampling CLI."""
from __future__ import annotations

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jdistill import files
from jdistill.data import pipeline
from jdistill.diffusion import sampling
from jdistill.diffusion.schedules import flow_time
from jdistill.eval import features as features_lib
from jdistill.eval import frechet
from jdistill.eval import neighbours


class Sampler:
  """Draws samples from a denoiser with an N-step sampler (DDIM, ancestral or re-noise), N traced:
  one compilation (and one more for sampling on given grids, padded to one shape)."""

  def __init__(self, denoiser, schedule, data_shape, *, clip_x=True, batch_size=500):
    self.denoiser, self.schedule, self.data_shape = denoiser, schedule, tuple(data_shape)
    self.clip_x, self.batch_size = clip_x, batch_size

  @functools.partial(jax.jit, static_argnums=(0, 5, 8))
  def _sample_batch(self, params, noise, label, num_steps, mode, rng, grid, guidance):
    # step-conditioned generators (TDM-unify) are told the step count; other params ignore it
    # flow maps ('flowmap' mode) are told each step's flow-time interval h = tau_t - tau_s
    # guidance-conditioned students are told w; other models are guided with two passes
    def predict(z, logsnr, logsnr_end=None):
      steps = jnp.full((z.shape[0],), num_steps, jnp.int32)
      interval = None if logsnr_end is None else flow_time(logsnr) - flow_time(logsnr_end)
      return self.denoiser.predict_with_guidance(params, z, logsnr, label, guidance, steps=steps,
                                                 interval=interval)
    return sampling.sample(predict, self.schedule, noise, num_steps, clip_x=self.clip_x,
                           rng=rng if mode in sampling.STOCHASTIC else None, mode=mode, grid=grid)

  def labels(self, num_samples: int, seed: int = 0) -> Optional[np.ndarray]:
    """The class labels `sample` draws for `seed` (uniform; None for an unconditional model)."""
    if not self.denoiser.num_classes:
      return None
    return np.random.RandomState(seed).randint(0, self.denoiser.num_classes, num_samples)

  def sample(self, params, num_steps: int, num_samples: int, seed: int = 0,
             labels: Optional[np.ndarray] = None, mode: str = "ddim", timed: bool = False,
             grid=None, guidance: float = 0.0):
    """`num_samples` samples in the data range, as numpy; noise and labels depend only on `seed`.
    `mode`: 'ddim', 'ancestral' (DDPM), 'renoise' (few-step generators) or 'flowmap'. `timed`: (samples,
    ms per sample over the full batches after the first, which may compile; None without one).
    `grid`: the N + 1 sampling time points 0 = t_0 < ... < t_N = 1 (default uniform); a uniform
    one samples exactly as without it. `guidance`: the classifier-free guidance weight w: told to a
    guidance-conditioned student (one pass), else two-pass CFG of a model that learned an
    unconditional branch (a conditional teacher)."""
    if grid is not None:
      grid = sampling.padded_grid(grid, num_steps)
      uniform = np.float32(np.arange(num_steps + 1) / num_steps)
      grid = None if np.array_equal(grid[:num_steps + 1], uniform) else jnp.asarray(grid)
    rng = jax.random.key(seed)
    noise = np.asarray(jax.random.normal(rng, (num_samples, *self.data_shape)))
    if labels is None:
      labels = self.labels(num_samples, seed)
    out, seconds, timed_count = [], 0.0, 0
    for start in range(0, num_samples, self.batch_size):
      chunk = slice(start, start + self.batch_size)
      label = None if labels is None else jnp.asarray(labels[chunk], jnp.int32)
      clock = time.perf_counter()
      batch = self._sample_batch(params, jnp.asarray(noise[chunk]), label, jnp.int32(num_steps),
                                 mode, jax.random.fold_in(rng, start), grid, float(guidance))
      if timed:
        jax.block_until_ready(batch)
        if start > 0 and batch.shape[0] == self.batch_size:
          seconds, timed_count = seconds + time.perf_counter() - clock, timed_count + self.batch_size
      out.append(batch)
    samples = np.concatenate([np.asarray(o) for o in out])
    if not timed:
      return samples
    return samples, (1000.0 * seconds / timed_count if timed_count else None)


def time_sampling(sampler, params, num_steps, num_samples=256, repeats=2, mode="ddim",
                  guidance: float = 0.0):
  """Median milliseconds per sample of `num_steps`-step sampling (after a warm-up call)."""
  sampler.sample(params, num_steps, num_samples, mode=mode, guidance=guidance)
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    sampler.sample(params, num_steps, num_samples, seed=r, mode=mode, guidance=guidance)
    times.append(time.perf_counter() - start)
  return 1000.0 * float(np.median(times)) / num_samples


TEACHER_SEED_OFFSETS = (1, 2)    # the teacher's samples for FD (teacher), and their floor


class FDEvaluator:
  """FD of samples against the held-out split in a feature net's space (+ sliced W for 2-D), and
  in the same features: nearest-neighbour metrics (memorised share, precision, recall) and, with
  a teacher set, FD to the teacher's samples."""

  def __init__(self, sampler: Sampler, reference_source, feature_name: str, num_samples: int,
               inception_weights: str = "", seed: int = 1234, final_num_samples: int = 0,
               training_source=None, neighbour_examples: int = 0):
    self.sampler, self.num_samples, self.seed = sampler, num_samples, seed
    self.final_num_samples = final_num_samples or num_samples     # the end-of-run tables
    self.features = features_lib.feature_fn(feature_name, inception_weights)
    self.feature_name = feature_name
    self.reference = pipeline.all_examples(reference_source)["x"]
    self.reference_features = self.features(self.reference)
    self.reference_stats = frechet.gaussian_stats(self.reference_features)
    self.is_2d = len(sampler.data_shape) == 1
    self.training_source, self.neighbour_examples = training_source, neighbour_examples
    self.teacher, self._teacher_features, self._data_floors = None, {}, {}

  @functools.cached_property
  def classify(self):
    """images -> classes, for the class accuracy of conditional samples (None: an unconditional
    model, or a feature net that is no classifier); loaded at the first evaluation."""
    if not self.sampler.denoiser.num_classes:
      return None
    return features_lib.classifier_fn(self.feature_name)

  @property
  def final_reuses_training_count(self) -> bool:
    """Whether an end-of-run table may reuse an evaluation from training (the same sample count)."""
    return self.final_num_samples == self.num_samples

  @functools.cached_property
  def neighbour_reference(self) -> dict:
    """Computed once per run, at first use: the real set of precision / recall (held-out features,
    at most `neighbour_examples`) and its k-NN radii; with a training source, training features
    (at most as many), the memorisation threshold (5th percentile of held-out-to-training nearest
    distances) and the held-out split's own memorised share (the floor)."""
    real = self.reference_features[_subset(len(self.reference_features), self.neighbour_examples)]
    out = dict(real=real, radii=neighbours.knn_radii(real) if len(real) > neighbours.K else None)
    if self.training_source is not None:
      index = _subset(len(self.training_source.records), self.neighbour_examples)
      train = self.features(np.stack([self.training_source.records[int(i)]["x"] for i in index]))
      threshold = neighbours.memorisation_threshold(real, train)
      out.update(train=train, threshold=threshold,
                 floor=neighbours.memorised_fraction(real, train, threshold))
    return out

  def neighbour_metrics(self, sample_features) -> dict:
    """{'memorised' (with a training source), 'precision', 'recall' (with > k samples and real
    examples)} of samples' features."""
    ref, result = self.neighbour_reference, {}
    if "train" in ref:
      result["memorised"] = neighbours.memorised_fraction(sample_features, ref["train"],
                                                          ref["threshold"])
    if ref["radii"] is not None and len(sample_features) > neighbours.K:
      result.update(neighbours.precision_recall(ref["real"], sample_features, ref["radii"]))
    return result

  def set_teacher(self, params, num_steps: int, mode: str = "ddim", guidance: float = 0.0):
    """The model that FD (teacher) compares samples with: `num_steps`-step samples of `params`
    (with its `guidance`), drawn (once per sample count) with other noise seeds than the
    evaluated samples."""
    self.teacher, self._teacher_features = (params, num_steps, mode, guidance), {}

  def teacher_features(self, count: int, draw: int = 0):
    """Features of `count` teacher samples from the `draw`-th teacher seed (cached)."""
    key = (count, draw)
    if key not in self._teacher_features:
      params, num_steps, mode, guidance = self.teacher
      self._teacher_features[key] = self.features(self.sampler.sample(
          params, num_steps, count, self.seed + TEACHER_SEED_OFFSETS[draw], mode=mode,
          guidance=guidance))
    return self._teacher_features[key]

  def fd_of(self, samples) -> dict:
    """FD (and sliced W for 2-D) against the held-out split, the neighbour metrics and, with a
    teacher set, 'fd_teacher'."""
    sample_features = self.features(samples)
    result = {"fd": frechet.frechet_distance_from_stats(
        *frechet.gaussian_stats(sample_features), *self.reference_stats)}
    if self.is_2d:
      result["swd"] = frechet.sliced_wasserstein(samples, self.reference)
    if self.teacher is not None:
      result["fd_teacher"] = frechet.frechet_distance(
          sample_features, self.teacher_features(len(samples)))
    result.update(self.neighbour_metrics(sample_features))
    return result

  def floors(self, count: int = 0) -> dict:
    """What the metrics read for real data, at the end-of-run sample count (or `count`):
    'fd_data': FD of training examples vs the held-out split, with 'data_count' of them (the
    count, or all when the split is smaller); 'memorised': the held-out split's own share;
    'fd_teacher': the teacher against itself with two other noise seeds (when one is set)."""
    count = count or self.final_num_samples
    out = {}
    if self.training_source is not None:
      if count not in self._data_floors:
        train = pipeline.all_examples(self.training_source, count)["x"]
        self._data_floors[count] = dict(
            fd_data=frechet.frechet_distance_from_stats(
                *frechet.gaussian_stats(self.features(train)), *self.reference_stats),
            data_count=len(train))
      out.update(self._data_floors[count], memorised=self.neighbour_reference["floor"])
    if self.teacher is not None:
      out["fd_teacher"] = frechet.frechet_distance(self.teacher_features(count),
                                                   self.teacher_features(count, draw=1))
    return out

  def evaluate(self, params, num_steps: int, mode: str = "ddim", final: bool = False, grid=None,
               guidance: float = 0.0):
    """(`fd_of`'s metrics [+ 'ms_per_sample'] [+ 'accuracy': conditional samples' class accuracy by
    the digits classifier], samples) for `num_steps`-step sampling (on `grid`, default uniform);
    `final`: with `final_num_samples` (the end-of-run tables, which also get the sampling speed),
    else `num_samples` (evaluations during training)."""
    count = self.final_num_samples if final else self.num_samples
    labels = self.sampler.labels(count, self.seed)
    samples, ms = self.sampler.sample(params, num_steps, count, self.seed, labels=labels,
                                      mode=mode, timed=True, grid=grid, guidance=guidance)
    result = self.fd_of(samples)
    if self.classify is not None:     # conditional samples: the share the classifier calls their label
      result["accuracy"] = float(np.mean(self.classify(samples) == labels))
    if final and ms is not None:       # the end-of-run tables' speed, from these very batches
      result["ms_per_sample"] = ms
    return result, samples

  def speed(self, result, params, num_steps: int, mode: str = "ddim", guidance: float = 0.0) -> float:
    """ms per sample for an end-of-run table: timed within `result`'s evaluation when it had a
    full batch after the first, else by `time_sampling`."""
    return result.get("ms_per_sample") or time_sampling(self.sampler, params, num_steps, mode=mode,
                                                        guidance=guidance)


def _subset(size: int, limit: int):
  """Indices of a fixed random subset of `limit` of `size` examples (all when limit is 0 or more)."""
  if not limit or size <= limit:
    return np.arange(size)
  return np.sort(np.random.RandomState(0).choice(size, limit, replace=False))


def image_grid(samples, columns: int = 10, max_images: int = 100):
  """Samples in [-1, 1] -> one float image grid in [0, 1] (H, W, C); 2-D points -> a scatter raster."""
  samples = np.asarray(samples)
  if samples.ndim == 2:                 # 2-D points: all of them, as a scatter raster
    return scatter_raster(samples)
  samples = samples[:max_images]
  n, h, w, c = samples.shape
  rows = -(-n // columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i, image in enumerate(samples):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = image
  return np.clip((grid + 1.0) / 2.0, 0.0, 1.0)


def scatter_raster(points, size: int = 256, extent: float = 1.5):
  image = np.ones((size, size, 1), np.float32)
  pixels = ((np.asarray(points) / extent + 1.0) / 2.0 * (size - 1)).round().astype(int)
  keep = np.all((pixels >= 0) & (pixels < size), axis=1)
  image[size - 1 - pixels[keep, 1], pixels[keep, 0]] = 0.0
  return image


def save_png(grid, path: str, scale: int = 4):
  from PIL import Image
  array = (np.asarray(grid) * 255).round().astype(np.uint8)
  if array.shape[-1] == 1:
    array = array[..., 0]
  import io
  image = Image.fromarray(array)
  buffer = io.BytesIO()
  image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(buffer, format="png")
  files.write_bytes(path, buffer.getvalue())


def to_uint8(samples):
  return ((np.clip(samples, -1, 1) + 1.0) * 127.5).round().astype(np.uint8)
