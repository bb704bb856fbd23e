"""Every training control reaches every method where it has a meaning, measurably, and is refused
(naming the field and the methods that support it) where it has none."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax import serialization

from conftest import tiny_teacher_params, tiny_unet
from jdistill import methods
from jdistill.data import pipeline
from jdistill.diffusion.parameterization import Prediction
from jdistill.errors import ConfigError
from jdistill.eval.evaluate import FDEvaluator, Sampler
from jdistill.methods import distribution_matching as dm_method
from jdistill.methods import multi_teacher as mt_method
from jdistill.methods import progressive as pd_method
from jdistill.methods import teacher as teacher_method
from jdistill.objectives import denoising
from jdistill.objectives import distribution_matching as dm
from jdistill.objectives import multi_teacher as mt
from jdistill.objectives import progressive as pd
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, setup

METHODS = ("teacher", "progressive", "dmd", "multi_teacher")
CONFIGS = {"teacher": teacher_method.get_config, "progressive": pd_method.get_config,
           "dmd": lambda preset: dm_method.get_config(preset, "dmd2"),
           "multi_teacher": mt_method.get_config}
for _name in ("reflow", "meanflow", "consistency"):       # refused controls are checked for these too
  CONFIGS[_name] = methods.get(_name).get_config


def tiny_config(name):
  """The method's digits defaults with the tiny U-Net, small batches and cheap evaluations."""
  config = tiny_unet(CONFIGS[name]("digits"))
  config.model.update(channel_mult=(1,), attention_resolutions=())    # the cheapest U-Net
  config.data.batch_size = 16
  config.optim.warmup_steps = 0                  # the first update moves the params
  config.eval.update(num_samples=32, final_num_samples=0, final_steps=(2,),
                     steps_during_training=(2,), batch_size=32)
  if name == "dmd":
    config.dmd.update(regression_weight=0.0, critic_updates_per_generator=1, eval_steps=(1,))
  if name == "multi_teacher":
    config.multi_teacher.update(teachers={"a": dict(checkpoint="a.msgpack", weight=1.0),
                                          "b": dict(checkpoint="b.msgpack", weight=1.0)},
                                student_init="a")
  return config


def trainable_params(name, state):
  """What the optimizer moves: the params (or adapters); DM: generator and critic."""
  return (state.generator.params, state.critic.params) if name == "dmd" else state.params


def ema_params(name, state):
  return state.generator.ema_params if name == "dmd" else state.ema_params


def run_steps(name, config, tmp_path, steps):
  """The method's objective (built by its driver's make_objective) over `steps` train steps from
  random params (the teacher's too, where there is one); returns the host copies of the state before and after each step."""
  exp = setup.build(config, str(tmp_path), evaluator=False, record_config=False)
  init = jax.tree.map(jnp.asarray, tiny_teacher_params(config, 0))    # no zero-initialised layers
  batch = next(pipeline.make_iterator(exp.train_data()))
  lora = config.lora.rank > 0
  stage = None
  if name == "teacher":
    objective = teacher_method.make_objective(exp, 10)
    frozen = denoising.DenoisingFrozen(base=init if lora else None)
  elif name == "progressive":
    objective = pd_method.make_objective(exp)
    frozen = pd.ProgressiveFrozen(teacher=init, student_base=init if lora else None)
    stage = pd.make_stage(pd.nested_grids([4, 2]), 0, 10)
  elif name == "dmd":
    objective = dm_method.make_objective(exp, 10)
    frozen = dm.DistributionMatchingFrozen(teacher=init)
  else:
    objective = mt_method.make_objective(exp, ("a", "b"))
    frozen = mt.MultiTeacherFrozen(weights=jnp.array([0.5, 0.5]), base=init if lora else None)
    rng = np.random.RandomState(0)
    batch = dict(batch, t=rng.uniform(size=16).astype(np.float32),
                 eps=rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                 teacher_v=rng.normal(size=(16, 2, 8, 8, 1)).astype(np.float32))
  compiled = loop.compile_step(objective, exp.mesh)
  state = jax.jit(objective.new_state)(init)
  states = [jax.device_get(state)]
  for i in range(steps):
    state, metrics = compiled(state, batch, jax.random.key(i), frozen, stage, i)
    states.append(jax.device_get(state))
  return objective, frozen, states, metrics, init


def same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", METHODS)
def test_gradient_accumulation_and_ema_warmup_reach_every_method(name, tmp_path):
  """Accumulation over 2 micro-steps: the first leaves every network of the method (and its EMA)
  where it was, the second moves it. EMA warmup: that first real update's EMA decay is
  min(decay, 1/10), so ema_1 = d ema_0 + (1 - d) params_1, by hand (without warmup the decay
  itself: tests/test_training_controls.py)."""
  config = tiny_config(name)
  config.optim.update(accumulate_steps=2, ema_warmup=True)
  _, _, states, _, _ = run_steps(name, config, tmp_path, 2)
  networks = lambda state: trainable_params(name, state) if name == "dmd" else (state.params,)
  for before, first, second in zip(*(networks(state) for state in states)):
    assert same(first, before) and not same(second, before)
  assert same(ema_params(name, states[1]), ema_params(name, states[0]))
  d = min(config.optim.ema_decay, 0.1)
  params_1 = states[2].generator.params if name == "dmd" else states[2].params
  expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema_params(name, states[0]), params_1)
  for got, want in zip(jax.tree.leaves(ema_params(name, states[2])), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ("teacher", "dmd", "multi_teacher"))
def test_lora_trains_only_adapters_over_a_frozen_base(name, tmp_path):
  """progressive's LoRA student: tests/test_training_controls.py."""
  config = tiny_config(name)
  config.lora.update(rank=2, alpha=2.0, targets=("Dense_0/kernel",))
  objective, frozen, states, _, init = run_steps(name, config, tmp_path, 2)
  adapters = trainable_params(name, states[-1])
  for tree in (adapters if name == "dmd" else (adapters,)):
    score = tree["score"] if "score" in tree else tree          # DM's critic: adapters + GAN head
    assert set(score) == {"Dense_0/kernel"}
  merged = jax.device_get(objective.eval_params(jax.tree.map(jnp.asarray, states[-1]), frozen))
  changed = [jax.tree_util.keystr(path) for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(jax.device_get(init)))
      if not np.array_equal(a, b)]
  assert changed == ["['Dense_0']['kernel']"]     # the merged network moved in the adapted kernel only


def test_curriculum_reaches_the_teacher(tmp_path):
  """progressive's curriculum: tests/test_training_controls.py."""
  config = tiny_config("teacher")
  config.curriculum.update(sampler="adaptive", update_every=1)
  _, _, states, metrics, _ = run_steps("teacher", config, tmp_path, 2)
  assert int(states[-1].curriculum.visits.sum()) == 2 * 16
  assert "curriculum/probability_0" in metrics


@pytest.mark.parametrize("name, field, value, supporters", [
    ("teacher", "features.weight_start", 1.0, "progressive"),
    ("dmd", "features.weight_start", 1.0, "progressive"),
    ("multi_teacher", "features.weight_start", 1.0, "progressive"),
    ("dmd", "curriculum.sampler", "adaptive", "progressive, teacher"),
    ("multi_teacher", "curriculum.sampler", "adaptive", "progressive, teacher"),
    ("progressive", "diffusion.guidance", 2.0, "dmd, reflow, teacher"),
    ("multi_teacher", "diffusion.guidance", 2.0, "dmd, reflow, teacher"),
    ("meanflow", "diffusion.guidance", 2.0, "dmd, reflow, teacher"),
    ("consistency", "diffusion.guidance", 2.0, "dmd, reflow, teacher"),
    ("progressive", "diffusion.time_sampling", "logit_normal", "teacher"),
    ("dmd", "diffusion.time_sampling", "logit_normal", "teacher"),
    ("reflow", "lora.rank", 2, "dmd, multi_teacher, progressive, teacher"),
    ("meanflow", "lora.rank", 2, "dmd, multi_teacher, progressive, teacher"),
    ("consistency", "curriculum.sampler", "adaptive", "progressive, teacher"),
    ("reflow", "features.weight_start", 1.0, "progressive"),
])
def test_a_control_a_method_does_not_support_is_refused(name, field, value, supporters):
  config = tiny_config(name)
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ConfigError, match=f"config.{field}.*{name!r} does not support .*methods "
                                        f"that do: {supporters}$"):
    methods.validate(config, 1)


def test_lora_where_there_is_nothing_to_adapt_is_refused():
  teacher = tiny_config("teacher")
  teacher.lora.rank = 4                        # from scratch
  with pytest.raises(ConfigError, match="config.lora.rank: .*teacher.checkpoint"):
    methods.validate(teacher, 1)
  student = tiny_config("multi_teacher")
  student.lora.rank = 4
  student.multi_teacher.student_init = "random"
  with pytest.raises(ConfigError, match="config.lora.rank: .*student_init"):
    methods.validate(student, 1)
  tdm = dm_method.get_config("digits", "tdm")  # K = 4 with a step-aware critic
  tdm.lora.rank = 4
  with pytest.raises(ConfigError, match="config.lora.rank: .*step_aware_critic"):
    methods.validate(tdm, 1)
  tdm.dmd.step_aware_critic = False
  methods.validate(tdm, 1)


def worsening_fd(monkeypatch):
  """Every evaluation scores worse than the one before (the first is the best)."""
  scores = iter(range(1000))

  def evaluate(self, params, num_steps, mode="ddim", final=False, grid=None, guidance=0.0):
    count = self.final_num_samples if final else self.num_samples
    return {"fd": float(next(scores)), "ms_per_sample": 1.0}, np.zeros((count, *self.sampler.data_shape))
  monkeypatch.setattr(FDEvaluator, "evaluate", evaluate)


@pytest.mark.parametrize("name", METHODS)
def test_early_stopping_reaches_every_method(name, tmp_path, monkeypatch, teacher_cache):
  """patience 1, an evaluation every 2 steps, FD worse at each: every method's run stops at step
  4 of 8 (the first evaluation sets the best, the second does not improve on it)."""
  worsening_fd(monkeypatch)
  if name == "multi_teacher":
    config = teacher_cache[0].copy_and_resolve_references()
    config.cache.dir = os.path.join(teacher_cache[1], "cache")
    config.eval.update(num_samples=32, batch_size=32)
  else:
    config = tiny_config(name)
    teacher = str(tmp_path / "teacher.msgpack")
    with open(teacher, "wb") as f:
      f.write(serialization.to_bytes(tiny_teacher_params(config, 0)))
    config.teacher.update(checkpoint=teacher, sampling_steps=4)
  config.train.update(num_steps=8, eval_every=2, save_every=0, log_every=2, early_stopping_patience=1)
  if name == "progressive":
    config.progressive.update(steps="4,2", steps_per_stage=8, stage_overrides="", eval_every=2,
                              validation_examples=0)
  workdir = str(tmp_path / "run")
  methods.train(config, workdir)
  checkpoints = os.path.join(workdir, "stages", "0_2steps") if name == "progressive" else workdir
  manager = ckpt_lib.manager(os.path.join(checkpoints, "checkpoints"), asynchronous=False)
  assert manager.latest_step() == 4
  assert ckpt_lib.read_meta(os.path.join(checkpoints, "checkpoints"))["stopped_early"]
  best = ckpt_lib.manager(os.path.join(checkpoints, "best"), asynchronous=False)
  assert best.latest_step() == 2                  # the best-evaluated state is kept


@pytest.mark.parametrize("name", ("progressive", "dmd"))
def test_min_snr_gamma_reaches_the_progressive_loss_and_the_critic(name, tmp_path):
  """config.diffusion.min_snr_gamma is the gamma of min(SNR, gamma): with gamma above every SNR
  the 'min_snr' loss is the eps-MSE ('eps_mse': SNR) loss; with gamma = 0.1 it is not."""
  exp = setup.build(tiny_config(name), str(tmp_path), evaluator=False, record_config=False)
  params = jax.tree.map(jnp.asarray, tiny_teacher_params(exp.config, 0))
  batch = next(pipeline.make_iterator(exp.train_data()))
  rng = jax.random.key(0)

  def loss(weighting, gamma):
    c = exp.config
    c.diffusion.min_snr_gamma = gamma
    if name == "progressive":
      c.progressive.loss_weighting = weighting
      stage = pd.make_stage(pd.nested_grids([4, 2]), 0, 10)
      return float(pd_method.make_objective(exp).validation_loss(params, params, batch, rng, stage))
    c.dmd.critic_weighting = weighting
    critic = nn.unbox(dm_method.make_objective(exp, 10).init_state(rng)).critic.params
    steps = jnp.ones((16,), jnp.int32)
    x = jnp.asarray(batch["x"])
    generated = Prediction(x, jnp.zeros_like(x), jnp.zeros_like(x))    # DMD2 noises x_hat afresh
    return float(dm_method.make_objective(exp, 10).critic_loss(
        critic, generated, x, None, steps, jnp.ones((16,)), rng)[0])

  eps_mse = loss("eps_mse", 5.0)
  np.testing.assert_allclose(loss("min_snr", 1e30), eps_mse, rtol=1e-6)
  assert loss("min_snr", 0.1) < 0.5 * eps_mse


def test_guidance_is_what_each_model_takes_on_class_conditional_digits(tmp_path, monkeypatch):
  """A DMD2 generator trained against the guided teacher is evaluated without guidance (it learned
  the guided distribution); the teacher's rows and FD (teacher) sample with it; the export says so."""
  config = tiny_config("dmd")
  config.model.num_classes = 10
  config.diffusion.guidance = 2.0
  config.teacher.sampling_steps = 2
  config.train.update(num_steps=2, log_every=1, save_every=0, eval_every=0)
  config.eval.update(final_steps=(1,), num_samples=8, batch_size=8)
  config.dmd.update(eval_steps=(1,))
  calls = []
  sample = Sampler.sample

  def recording(self, params, num_steps, num_samples, seed=0, **kw):
    calls.append((kw.get("mode", "ddim"), kw.get("guidance", 0.0)))
    return sample(self, params, num_steps, num_samples, seed, **kw)
  monkeypatch.setattr(Sampler, "sample", recording)
  monkeypatch.setattr(dm_method.teachers, "load_teacher",
                      lambda exp: jax.tree.map(jnp.asarray, tiny_teacher_params(exp.config, 0)))
  methods.train(config, str(tmp_path))
  assert ("renoise", 0.0) in calls and ("ddim", 2.0) in calls
  assert set(calls) == {("renoise", 0.0), ("ddim", 2.0)}, set(calls)
  exported = json.load(open(tmp_path / f"{dm_method.EXPORT[:-len('.msgpack')]}.json"))
  assert exported["sampling"]["guidance"] == 0.0


def test_the_sampler_guides_only_when_asked(tmp_path):
  config = tiny_config("teacher")
  config.model.num_classes = 10
  exp = setup.build(config, str(tmp_path), evaluator=False, record_config=False)
  params = jax.tree.map(jnp.asarray, tiny_teacher_params(config, 0))
  labels = np.arange(8) % 10
  plain = exp.sampler.sample(params, 2, 8, labels=labels)
  unguided = exp.sampler.sample(params, 2, 8, labels=labels, guidance=0.0)
  guided = exp.sampler.sample(params, 2, 8, labels=labels, guidance=2.0)
  np.testing.assert_array_equal(plain, unguided)
  assert np.abs(guided - unguided).max() > 1e-3


@pytest.mark.parametrize("name,policy", [(name, "full") for name in METHODS] + [("dmd", "dots")])
def test_remat_reaches_every_method_and_leaves_its_step_unchanged(name, policy, tmp_path):
  """config.train.remat puts every network pass under jax.checkpoint (the Denoiser's one apply):
  two train steps end where the plain steps end, to 1e-6."""
  plain = run_steps(name, tiny_config(name), tmp_path / "plain", 2)
  config = tiny_config(name)
  config.train.remat = policy
  remat = run_steps(name, config, tmp_path / "remat", 2)
  assert remat[0].denoiser.remat == policy
  for got, want in zip(jax.tree.leaves(remat[2][-1]), jax.tree.leaves(plain[2][-1])):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
