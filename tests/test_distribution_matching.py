"""DMD2 / TDM: critic learning, the zero-gradient fixed point, update ratio, checkpoint/resume."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metric_writers

from jdistill.config import distribution_matching_config
from jdistill.data import pipeline
from jdistill.objectives import distribution_matching as dm
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, partitioning, setup


def _setup(tmp_path, variant="dmd2", **dmd):
  config = distribution_matching_config("toy2d", variant)
  config.model.update(channels=32, num_res_blocks=1)
  config.data.batch_size = 64
  config.dmd.update(dmd)
  exp = setup.build(config, str(tmp_path), evaluator=False)
  objective = dm.make_objective(exp, 100)
  teacher = jax.jit(lambda r: nn.unbox(exp.denoiser.init(r, jnp.zeros((1, 2)))["params"]))(jax.random.key(0))
  teacher = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), teacher)
  return exp, objective, teacher


def _batches(exp, n):
  iterator = pipeline.make_iterator(exp.train_data())
  return [pipeline.to_global(next(iterator), partitioning.batch_sharding(exp.mesh)) for _ in range(n)]


@pytest.mark.parametrize("variant", ["dmd2", "tdm"])
def test_critic_loss_falls_on_a_fixed_generator(tmp_path, variant):
  exp, objective, teacher = _setup(tmp_path, variant, critic_updates_per_generator=10_000, critic_lr=1e-3)
  compiled = loop.compile_step(objective, exp.mesh)
  state = jax.jit(objective.new_state)(teacher)
  generator_before = jax.device_get(state.generator.params)
  losses = []
  batch = _batches(exp, 1)[0]
  for i in range(60):       # one fixed problem: same batch, noise and timesteps every step
    state, metrics = compiled.fn(state, batch, jax.random.key(0), {"teacher": teacher}, {})
    losses.append(float(metrics["critic_loss"]))
  assert losses[-1] < 0.7 * losses[0], losses
  for a, b in zip(jax.tree.leaves(jax.device_get(state.generator.params)), jax.tree.leaves(generator_before)):
    np.testing.assert_array_equal(a, b)          # the generator was never updated


@pytest.mark.parametrize("variant", ["dmd2", "tdm"])
def test_generator_gradient_vanishes_when_fake_score_equals_real_score(tmp_path, variant):
  """The generator samples the teacher's distribution exactly when its critic is the teacher:
  then x_real = x_fake and the distribution-matching gradient is exactly zero."""
  exp, objective, teacher = _setup(tmp_path, variant, generator_steps=2)
  noise = jax.random.normal(jax.random.key(3), (64, 2))
  z_k, t_k = objective.rollout(teacher, noise, None, jax.random.key(4))

  def grad_norm(critic_score):
    grads = jax.grad(lambda p: objective.generator_loss(
        p, {"score": critic_score, "gan_head": {}}, teacher, z_k, t_k, noise, None,
        jax.random.key(5))[0])(teacher)
    return float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))

  assert grad_norm(teacher) < 1e-6
  perturbed = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(6), p.shape), teacher)
  assert grad_norm(perturbed) > 1e-3


def test_update_ratio_is_respected(tmp_path):
  exp, objective, teacher = _setup(tmp_path, critic_updates_per_generator=5)
  compiled = loop.compile_step(objective, exp.mesh)
  state = jax.jit(objective.new_state)(teacher)
  updated = []
  for i, batch in enumerate(_batches(exp, 12)):
    state, metrics = compiled.fn(state, batch, jax.random.key(i), {"teacher": teacher}, {})
    updated.append(int(metrics["generator_updated"]))
  assert updated == [0, 0, 0, 0, 1] * 2 + [0, 0]
  assert int(state.critic.step) == 12 and int(state.generator.step) == 2 and int(state.step) == 12
  assert state.critic.ema_params is None          # no EMA copy of the critic


def test_checkpoint_resume_keeps_both_networks_and_optimizers(tmp_path):
  exp, objective, teacher = _setup(tmp_path, critic_updates_per_generator=2, gan_weight=0.1)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  compiled = loop.compile_step(objective, exp.mesh)
  make_state = jax.jit(objective.new_state)
  common = dict(workdir=str(tmp_path / "run"), mesh=exp.mesh, writer=writer, frozen={"teacher": teacher},
                compiled=compiled, log_every=3, save_every=3, initial_state=lambda: make_state(teacher))
  unbroken, _ = loop.run(objective, train_data=exp.train_data(), num_steps=9,
                         **dict(common, workdir=str(tmp_path / "unbroken")))
  loop.run(objective, train_data=exp.train_data(), num_steps=6, **common)
  manager = ckpt_lib.manager(str(tmp_path / "run" / "checkpoints"), asynchronous=False)
  restored, _ = ckpt_lib.restore(manager, compiled.abstract_state)
  assert set(restored.critic.params) == {"score", "gan_head"} and int(restored.generator.step) == 3
  resumed, _ = loop.run(objective, train_data=exp.train_data(), num_steps=9, **common)
  for a, b in zip(jax.tree.leaves(jax.device_get(resumed)), jax.tree.leaves(jax.device_get(unbroken))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
