"""Reflow: its losses against hand computations, the exact 2-rectified flow of an affine coupling
(zero loss, one straight Euler step), and the two-stage run end to end."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jdistill.diffusion import sampling, schedules
from jdistill.errors import ConfigError
from jdistill.methods import reflow as reflow_method
from jdistill.models.denoiser import Denoiser
from jdistill.objectives.reflow import ReflowObjective, ReflowStage

M, A = 0.3, 0.5            # the affine coupling x = M + A z_1


def flow_schedule(shift=1.0):
  return schedules.make_schedule(ml_collections.ConfigDict(dict(name="flow", shift=shift)))


class AffineVelocity(nn.Module):
  """The exact 2-rectified flow velocity of the coupling x = M + A z_1 on the straight line
  z = (1 - tau) x + tau z_1: z_1 = (z - (1 - tau) M) / ((1 - tau) A + tau), v = z_1 - x; `error`
  adds a learnable offset."""
  @nn.compact
  def __call__(self, z, tau, label=None, train=False):
    tau = tau[:, None]
    z1 = (z - (1 - tau) * M) / ((1 - tau) * A + tau)
    return z1 - (M + A * z1) + self.param("error", nn.initializers.zeros, ())


def _objective(shift=1.0):
  denoiser = Denoiser(AffineVelocity(), "v", path="flow", time_input="t")
  return ReflowObjective(denoiser, flow_schedule(shift), optax.sgd(0.0), None, 10, (3,))


def _couplings(n=256):
  z1 = jax.random.normal(jax.random.key(0), (n, 3))
  return {"label": jnp.zeros((n,), jnp.int32), "trajectory": jnp.stack([z1, M + A * z1], axis=1)}


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_exact_rectified_flow_of_an_affine_coupling_has_zero_loss_and_one_straight_step(shift):
  objective = _objective(shift)
  params = {"error": jnp.zeros(())}
  couplings = _couplings()
  for distill in (False, True):
    stage = ReflowStage(distill=jnp.asarray(distill), num_steps=10)
    assert float(objective.loss(params, couplings, 64, stage, jax.random.key(1))[0]) < 1e-9
    wrong = float(objective.loss({"error": jnp.array(0.1)}, couplings, 64, stage,
                                 jax.random.key(1))[0])
    assert wrong > 1e-4
  # straight: one Euler step from z_1 lands on the coupled x
  predict = lambda z, logsnr: objective.denoiser.predict(params, z, logsnr)
  z1, x = couplings["trajectory"][:, 0], couplings["trajectory"][:, 1]
  np.testing.assert_allclose(sampling.sample(predict, objective.schedule, z1, 1, clip_x=False), x,
                             atol=1e-4)


def test_losses_against_hand_computation():
  """Reflow: mean ||v_hat - (z_1 - x)||^2 on z = (1 - tau) x + tau z_1 (flow_v_mse); distill:
  mean ||x_hat(z_1) - x||^2, with a constant velocity error e: e^2 and (tau_1 e)^2."""
  objective = _objective()
  couplings = _couplings()
  error = 0.2
  params = {"error": jnp.array(error)}
  reflow, _ = objective.loss(params, couplings, 64, ReflowStage(jnp.asarray(False), 10),
                             jax.random.key(2))
  np.testing.assert_allclose(reflow, error**2, rtol=1e-3)
  distill, _ = objective.loss(params, couplings, 64, ReflowStage(jnp.asarray(True), 10),
                              jax.random.key(2))
  tau_1 = float(schedules.flow_time(objective.schedule(1.0)))
  np.testing.assert_allclose(distill, (tau_1 * error) ** 2, rtol=1e-3)


@pytest.mark.parametrize("field,value", [("couplings", 0), ("coupling_steps", 0),
                                         ("reflow_steps", 0), ("distill_steps", -1),
                                         ("eval_steps", (2, 0))])
def test_invalid_reflow_field_is_named(field, value):
  config = reflow_method.get_config()
  reflow_method.validate(config)
  config.reflow[field] = value
  with pytest.raises(ConfigError, match=f"config.reflow.{field}"):
    reflow_method.validate(config)


def test_reflow_runs_both_stages_and_exports(tmp_path):
  """A tiny run from a random tiny flow teacher: both stages train, export and report."""
  from conftest import tiny_teacher_params, tiny_unet
  from jdistill import methods
  from jdistill.train import teachers
  config = tiny_unet(reflow_method.get_config())
  config.data.batch_size = 16
  config.teacher.update(sampling_steps=2, checkpoint=str(tmp_path / "teacher.msgpack"))
  config.reflow.update(couplings=32, coupling_steps=2, reflow_steps=6, distill_steps=4,
                       eval_steps=(1, 2))
  config.train.update(log_every=2, save_every=100, eval_every=0)
  config.eval.update(num_samples=32, neighbour_examples=100, batch_size=32)
  teachers.export(tiny_teacher_params(config, 0), config, config.teacher.checkpoint,
                  {"mode": "euler", "steps": 2})
  run = tmp_path / "reflow"
  methods.train(config, str(run))
  summary = (run / "summary.md").read_text()
  assert "| 2-rectified flow | 2 |" in summary and "| 2-rectified flow, distilled | 1 |" in summary
  for stage, steps in (("0_reflow", 6), ("1_distill", 4)):
    assert (run / "stages" / stage / "student.msgpack").exists()
    assert max(int(p) for p in os.listdir(run / "stages" / stage / "checkpoints")
               if p.isdigit()) == steps
  exported = json.loads((run / "student.json").read_text())
  assert exported["sampling"]["steps"] == 1 and exported["diffusion"]["schedule"]["name"] == "flow"
