"""grain pipelines: shuffle, repeat, augment, batch; deterministic by seed; state checkpointable.

Each process reads its own shard (`[process_index::process_count]`), and the batch it builds is
placed on the mesh with `jax.make_array_from_process_local_data`.
"""
from __future__ import annotations

import grain
import jax
import numpy as np


class _RandomFlip(grain.transforms.RandomMap):
  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = dict(element, x=element["x"][:, ::-1])
    return element


def train_dataset(source, batch_size: int, seed: int, flip: bool = False):
  """An endless, shuffled, per-process-sharded grain dataset of batches of `batch_size // processes`."""
  per_process = batch_size // jax.process_count()
  ds = grain.MapDataset.source(source.records).seed(seed).shuffle().repeat(None)
  ds = ds[jax.process_index()::jax.process_count()]
  if flip and source.is_image:
    ds = ds.random_map(_RandomFlip())
  return ds.batch(per_process, drop_remainder=True)


def make_iterator(dataset, iterator_state=None, prefetch_threads: int = 2):
  """An iterator over `dataset` (restored from `iterator_state`, a JSON-able dict, if given)."""
  iterator = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=prefetch_threads,
                                                            prefetch_buffer_size=4)))
  if iterator_state is not None:
    iterator.set_state(iterator_state)
  return iterator


def to_global(batch, sharding):
  """Process-local numpy batch -> global jax.Arrays sharded over the mesh's batch axes."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      batch)


def all_examples(source, limit=None):
  """The first `limit` examples of a source as stacked numpy arrays (for evaluation)."""
  n = len(source.records) if limit is None else min(limit, len(source.records))
  records = [source.records[i] for i in range(n)]
  return {k: np.stack([r[k] for r in records]) for k in records[0]}
