import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One XLA compilation cache for every process of the suite (both pytest-xdist workers and the
# subprocesses of the kill, resume, sharding and multi-process tests): a program compiled by one
# test is loaded, not compiled again, by the next that builds it. Compiled programs are keyed by
# their HLO, options and jax version, so results are those of a fresh compile.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "jdistill-tests-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

from jdistill.config import base_config  # noqa: E402


def perturbed(params, scale, seed):
  """params + scale * N(0, 1) noise drawn with key `seed`, in one jitted call (drawn eagerly, each
  leaf's shape compiles a program of its own: seconds per model on 2 cores)."""
  import jax
  return jax.jit(lambda tree: jax.tree.map(
      lambda p: p + scale * jax.random.normal(jax.random.key(seed), p.shape), tree))(params)


def tiny_unet(config):
  """A few-thousand-parameter U-Net so training tests take seconds on 2 CPU cores."""
  config.model.update(channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                      norm_groups=4)
  return config


@pytest.fixture
def digits_config():
  config = tiny_unet(base_config("digits"))
  config.data.batch_size = 16
  config.train.update(num_steps=8, log_every=4, save_every=4, eval_every=0)
  config.eval.update(num_samples=64, final_steps=(2,), steps_during_training=(2,), batch_size=64)
  return config


@pytest.fixture
def toy2d_config():
  config = base_config("toy2d")
  config.model.update(channels=32, num_res_blocks=1)
  config.data.batch_size = 64
  config.train.update(num_steps=8, log_every=4, save_every=4, eval_every=0)
  config.eval.update(num_samples=256, final_steps=(2,), steps_during_training=(2,), batch_size=256)
  return config


def tiny_multi_teacher_config(directory):
  """configs/multi_teacher.py with the tiny U-Net and two tiny teachers 'a' (weight 3) and 'b'
  (weight 1) at `directory`/{a,b}.msgpack; caches of the 1297 train digits x 2 noise draws in
  shards of 256 digits; a short, quiet student run."""
  from jdistill.methods import multi_teacher as mt_method
  config = tiny_unet(mt_method.get_config("digits"))
  config.multi_teacher.teachers = {
      "a": dict(checkpoint=os.path.join(directory, "a.msgpack"), weight=3.0),
      "b": dict(checkpoint=os.path.join(directory, "b.msgpack"), weight=1.0)}
  config.multi_teacher.evaluate_teachers = False
  config.cache.update(noise_draws=2, records_per_shard=256, build_batch_size=256, read_threads=2)
  config.data.batch_size = 16
  config.teacher.sampling_steps = 4
  config.train.update(num_steps=8, log_every=4, save_every=100, eval_every=0)
  config.eval.update(num_samples=64, final_steps=(2,), steps_during_training=(2,), batch_size=64)
  return config


def tiny_teacher_params(config, seed, base=0):
  """Random params of config.model (numpy: no init to compile) that make a teacher with a non-trivial
  v-prediction: kernels N(0, 1 / fan_in), biases and norm scales around 0 and 1. `seed` != `base`:
  a 'fine-tune' of `base`, its params plus 30% of another such draw."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jdistill.diffusion.schedules import path_of
  from jdistill.models.denoiser import make_denoiser
  denoiser = make_denoiser(config.model, (8, 8, 1), config.diffusion.parameterization,
                           path_of(config.diffusion.schedule), config.diffusion.schedule)
  shapes = nn.unbox(jax.eval_shape(denoiser.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"])

  def draw(rng, path, leaf):
    name = jax.tree_util.keystr(path)
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if "scale" in name:
      return 0.1 * noise
    if "bias" in name or "embedding" in name:
      return 0.1 * noise
    return noise / np.sqrt(np.prod(leaf.shape[:-1]))

  def params(rng):
    return jax.tree_util.tree_map_with_path(lambda path, leaf: draw(rng, path, leaf), shapes)
  start = params(np.random.RandomState(base))
  delta = params(np.random.RandomState(seed))
  return jax.tree_util.tree_map_with_path(
      lambda path, b, d: ("scale" in jax.tree_util.keystr(path)) + b + (0.3 * d if seed != base else 0.0),
      start, delta)


def export_tiny_teachers(config):
  """Each teacher of the config: tiny random params exported as its .msgpack."""
  from flax import serialization
  for k, teacher_id in enumerate(sorted(config.multi_teacher.teachers)):
    with open(config.multi_teacher.teachers[teacher_id].checkpoint, "wb") as f:
      f.write(serialization.to_bytes(tiny_teacher_params(config, k)))


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
  """(config, workdir): latents and both tiny teachers' caches built under <workdir>/cache. Tests
  that damage a cache copy the workdir first."""
  from jdistill.methods import multi_teacher
  workdir = str(tmp_path_factory.mktemp("multi_teacher"))
  config = tiny_multi_teacher_config(workdir)
  export_tiny_teachers(config)
  multi_teacher.build_latents_cache(config, workdir)
  for teacher_id in config.multi_teacher.teachers:
    multi_teacher.build_teacher_cache(config, workdir, teacher_id)
  return config, workdir
