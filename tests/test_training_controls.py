"""LoRA students, gradient accumulation, early stopping, feature distillation, and the adaptive
curriculum inside a real progressive run (checkpoint/resume)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from clu import metric_writers

from jdistill.models.lora import LoRA
from jdistill.methods import progressive
from jdistill.objectives import progressive as progressive_math
from jdistill.train import checkpoint as ckpt_lib
from jdistill.objectives import state as state_lib
from jdistill.train import loop, setup
from jdistill.train import teachers as teacher_lib
from jdistill import methods
from jdistill.methods.teacher import make_objective as objective_for

from test_progressive import _progressive_config, _run, toy_teacher  # noqa: F401 - fixture


def _optim(**kw):
  c = ml_collections.ConfigDict(dict(name="adam", lr=1e-2, warmup_steps=0, schedule="constant",
                                     final_lr_fraction=0.0, grad_clip=0.0, weight_decay=0.0, b1=0.9,
                                     b2=0.99, eps=1e-8, accumulate_steps=1))
  c.update(kw)
  return c


def test_lora_merge_equals_base_plus_adapter_path():
  x = jax.random.normal(jax.random.key(0), (5, 6, 6, 3))
  conv = nn.Conv(4, (3, 3))
  dense = nn.Dense(7)
  params = {"conv": conv.init(jax.random.key(1), x)["params"],
            "dense": dense.init(jax.random.key(2), x.reshape(5, -1))["params"]}
  lora = LoRA(rank=2, alpha=3.0)
  adapters = lora.init(jax.random.key(3), params)
  assert sorted(adapters) == ["conv/kernel", "dense/kernel"]
  adapters = jax.tree.map(lambda a: a + 0.1, adapters)           # a trained (non-zero) adapter
  merged = lora.merge(params, adapters)
  # Dense: x W' = x W + (alpha / r) (x A) B
  h = x.reshape(5, -1)
  base = dense.apply({"params": params["dense"]}, h)
  adapter_path = 1.5 * (h @ adapters["dense/kernel"]["a"]) @ adapters["dense/kernel"]["b"]
  np.testing.assert_allclose(dense.apply({"params": merged["dense"]}, h), base + adapter_path,
                             rtol=1e-4, atol=1e-4)
  # Conv: conv(x, W') = conv(x, W) + (alpha / r) conv(x, reshape(A B)) (no bias on the adapter)
  delta = (adapters["conv/kernel"]["a"] @ adapters["conv/kernel"]["b"]).reshape(3, 3, 3, 4)
  adapter_conv = nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": 1.5 * delta}}, x)
  np.testing.assert_allclose(conv.apply({"params": merged["conv"]}, x),
                             conv.apply({"params": params["conv"]}, x) + adapter_conv, rtol=1e-4, atol=1e-4)
  # a fresh adapter (B = 0) leaves the model unchanged
  fresh = lora.merge(params, lora.init(jax.random.key(4), params))
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_lora_student_trains_only_adapters_and_keeps_the_base_bit_identical(toy_teacher, tmp_path):
  config = _progressive_config(toy_teacher)
  config.progressive.update(steps="4,2", steps_per_stage=30)
  config.lora.update(rank=2, alpha=2.0, targets=(r".*Dense_[12]/kernel",))
  exp = setup.build(config, str(tmp_path), evaluator=False)
  teacher = teacher_lib.load_teacher(exp)
  teacher_copy = jax.tree.map(np.array, jax.device_get(teacher))
  objective = progressive.make_objective(exp)
  compiled = loop.compile_step(objective, exp.mesh)
  state = jax.jit(objective.new_state)(teacher)
  assert set(state.params) == {"Dense_1/kernel", "Dense_2/kernel"}   # the optimizer sees only adapters
  frozen = progressive_math.ProgressiveFrozen(teacher=teacher, student_base=teacher)
  stage = progressive_math.make_stage(progressive_math.nested_grids([4, 2]), 0, 30)
  from jdistill.data import pipeline
  from jdistill import partitioning
  iterator = pipeline.make_iterator(exp.train_data())
  for i in range(30):
    batch = pipeline.to_global(next(iterator), partitioning.batch_sharding(exp.mesh))
    state, metrics = compiled.fn(state, batch, jax.random.key(i), frozen, stage)
  for a, b in zip(jax.tree.leaves(jax.device_get(teacher)), jax.tree.leaves(teacher_copy)):
    np.testing.assert_array_equal(a, b)
  student = objective.eval_params(state, frozen)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(student), jax.tree.leaves(teacher_copy))]
  assert sum(changed) == 2           # exactly the two adapted kernels moved


def test_gradient_accumulation_equals_one_large_batch():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)), params) for i in range(4)]
  mean_grad = jax.tree.map(lambda *g: sum(g) / 4, *grads)
  large = state_lib.make_optimizer(_optim())
  micro = state_lib.make_optimizer(_optim(accumulate_steps=4))
  a = state_lib.create(params, large)
  a = state_lib.apply_gradients(a, mean_grad, large, 0.9, 1e-2)
  b = state_lib.create(params, micro)
  for g in grads:
    b = state_lib.apply_gradients(b, g, micro, 0.9, 1e-2)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(a.ema_params), jax.tree.leaves(b.ema_params)):
    np.testing.assert_allclose(x, y, rtol=1e-6)     # the EMA moved once, like the large batch


def test_ema_warmup_decay_is_min_of_decay_and_n_schedule():
  """EMA warmup: after n updates the decay is min(decay, (1 + n) / (10 + n)); by hand with plain
  SGD (lr 1, gradient -1: the param counts the updates)."""
  optimizer = optax.identity()
  state = state_lib.create({"w": jnp.zeros(())}, optimizer)
  ema, decay = 0.0, 0.3                     # the schedule passes 0.3 at n = 3
  for n in range(6):
    state = state_lib.apply_gradients(state, {"w": -jnp.ones(())}, optimizer, decay, 1.0,
                                      ema_warmup=True)
    d = min(decay, (1 + n) / (10 + n))
    ema = d * ema + (1 - d) * (n + 1)
    np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)
  first = state_lib.apply_gradients(state_lib.create({"w": jnp.zeros(())}, optimizer),
                                    {"w": -jnp.ones(())}, optimizer, decay, 1.0, ema_warmup=True)
  plain = state_lib.apply_gradients(state_lib.create({"w": jnp.zeros(())}, optimizer),
                                    {"w": -jnp.ones(())}, optimizer, decay, 1.0)
  np.testing.assert_allclose(first.ema_params["w"], 0.9)    # n = 0: decay 1/10, w = 1
  np.testing.assert_allclose(plain.ema_params["w"], 0.7)    # without warmup: the decay itself
  # with gradient accumulation n counts real updates: 2 micro-steps of 2 = the first update
  micro = state_lib.make_optimizer(_optim(accumulate_steps=2))
  accumulated, ema, params = state_lib.create({"w": jnp.zeros(())}, micro), 0.0, []
  for _ in range(4):
    accumulated = state_lib.apply_gradients(accumulated, {"w": -jnp.ones(())}, micro, decay, 1e-2,
                                            ema_warmup=True)
    params.append(float(accumulated.params["w"]))
  for n, w in enumerate(params[1::2]):      # the params after real updates 1 and 2
    d = min(decay, (1 + n) / (10 + n))
    ema = d * ema + (1 - d) * w
  np.testing.assert_allclose(accumulated.ema_params["w"], ema, rtol=1e-6)


def test_early_stopping_keeps_best_and_resume_does_not_train_on(tmp_path, digits_config):
  exp = setup.build(digits_config, str(tmp_path), evaluator=False)
  objective = objective_for(exp, 100)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  fds = iter([5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 4.9])
  best_steps = []
  settings = loop.Settings(num_steps=40, log_every=2, save_every=0, eval_every=2,
                           early_stopping_patience=2)
  common = dict(workdir=str(tmp_path), mesh=exp.mesh, train_data=exp.train_data(), writer=writer,
                best_metric="fd")
  loop.run(objective, settings, evaluate=lambda params, step: ({"fd": next(fds)}, {}),
           on_best=lambda state, scalars, step: best_steps.append(step), **common)
  assert best_steps == [2, 4]                 # improved at evals 1 and 2, then 2 evals without
  manager = ckpt_lib.manager(str(tmp_path / "checkpoints"), asynchronous=False)
  assert manager.latest_step() == 8
  _, meta = ckpt_lib.restore(manager, loop.compile_step(objective, exp.mesh).abstract_state)
  assert meta["stopped_early"] and meta["best"] == 4.0
  calls = []
  loop.run(objective, settings, evaluate=lambda params, step: calls.append(step) or ({"fd": 0.0}, {}),
           **common)
  assert calls == [] and manager.latest_step() == 8        # a stopped run stays stopped


def test_feature_weight_schedules_against_hand_values():
  linear = progressive_math.FeatureDistillation(weight_start=1.0, weight_end=0.2, schedule="linear")
  cosine = progressive_math.FeatureDistillation(weight_start=1.0, weight_end=0.2, schedule="cosine")
  np.testing.assert_allclose([float(linear.weight(s, 100)) for s in (0, 50, 100)], [1.0, 0.6, 0.2], rtol=1e-6)
  np.testing.assert_allclose([float(cosine.weight(s, 100)) for s in (0, 50, 100)], [1.0, 0.6, 0.2],
                             rtol=1e-6)
  np.testing.assert_allclose(float(cosine.weight(25, 100)), 0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi / 4)), rtol=1e-6)


def test_feature_distillation_trains_on_unet_activations(tmp_path):
  import configs.progressive as progressive_config
  from conftest import perturbed, tiny_unet
  config = tiny_unet(progressive_config.get_config("digits"))
  config.features.update(layers=("down_1", "bottleneck"), weight_start=1.0, weight_end=0.0)
  exp = setup.build(config, str(tmp_path), evaluator=False)
  objective = progressive.make_objective(exp)
  compiled = loop.compile_step(objective, exp.mesh)
  teacher = loop.init_state(objective, compiled, jax.random.key(0)).params
  teacher = perturbed(teacher, 0.02, 1)
  student = perturbed(teacher, 0.02, 2)
  state = jax.jit(objective.new_state)(student)
  stage = progressive_math.make_stage(progressive_math.nested_grids([4, 2]), 0, 10)
  batch = {"x": np.asarray(exp.train_source.records.x[:16]), "label": np.zeros(16, np.int32)}
  losses = []
  for i in range(10):
    state, metrics = compiled.fn(state, batch, jax.random.key(0),
                                 progressive_math.ProgressiveFrozen(teacher=teacher), stage)
    losses.append(float(metrics["feature_loss"]))
  assert losses[0] > 0 and losses[-1] < losses[0]
  np.testing.assert_allclose(float(metrics["feature_weight"]), 0.5 * (1 + np.cos(np.pi * 0.9)), rtol=1e-5)


def test_adaptive_curriculum_survives_checkpoint_and_resume(toy_teacher, tmp_path):
  config = _progressive_config(toy_teacher)
  config.progressive.update(steps="8,4,2", steps_per_stage=60)
  config.curriculum.update(sampler="adaptive", update_every=10)
  unbroken_dir, resumed_dir = str(tmp_path / "unbroken"), str(tmp_path / "resumed")
  unbroken, _ = _run(config, unbroken_dir)
  with pytest.raises(KeyboardInterrupt):
    _run(config, resumed_dir, crash_after_batches=60 + 45)
  resumed, _ = _run(config, resumed_dir)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(unbroken)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  objective = progressive.make_objective(setup.build(config, unbroken_dir, evaluator=False,
                                                     record_config=False))
  abstract = loop.compile_step(objective, setup.build(config, unbroken_dir, evaluator=False,
                                                      record_config=False).mesh).abstract_state
  states = [ckpt_lib.restore(ckpt_lib.manager(os.path.join(d, "stages", "1_2steps", "checkpoints"),
                                              asynchronous=False), abstract)[0] for d in (unbroken_dir, resumed_dir)]
  np.testing.assert_allclose(states[0].curriculum.probabilities, states[1].curriculum.probabilities, atol=1e-7)
  np.testing.assert_allclose(states[0].curriculum.divergence, states[1].curriculum.divergence, atol=1e-7)
  assert float(states[0].curriculum.visits.sum()) == 60 * 64
  assert not np.allclose(states[0].curriculum.probabilities, 1 / 3)    # it adapted


def test_lora_stage_exports_merged_full_weights(toy_teacher, tmp_path):
  config = _progressive_config(toy_teacher)
  config.progressive.update(steps="4,2", steps_per_stage=10)
  config.lora.update(rank=2, alpha=2.0)
  student, _ = _run(config, str(tmp_path))
  exp = setup.build(config, str(tmp_path) + "_check", evaluator=False)
  exported = teacher_lib.load_exported(os.path.join(tmp_path, "stages", "0_2steps", "student.msgpack"),
                                       exp.abstract_params())
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(student)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_early_stop_on_a_save_step_is_recorded_and_stays_stopped(tmp_path, digits_config):
  """An early stop at a step that is also a save step: no second save of that step, the stop is
  recorded, and a rerun does not train on."""
  exp = setup.build(digits_config, str(tmp_path), evaluator=False)
  objective = objective_for(exp, 100)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  settings = loop.Settings(num_steps=40, log_every=2, save_every=2, eval_every=2,
                           early_stopping_patience=1)
  common = dict(workdir=str(tmp_path), mesh=exp.mesh, train_data=exp.train_data(), writer=writer,
                best_metric="fd")
  fds = iter([5.0, 6.0])
  loop.run(objective, settings, evaluate=lambda params, step: ({"fd": next(fds)}, {}), **common)
  meta = ckpt_lib.read_meta(str(tmp_path / "checkpoints"))
  assert meta["step"] == 4 and meta["stopped_early"] and meta["best"] == 5.0
  calls = []
  loop.run(objective, settings, evaluate=lambda params, step: calls.append(step) or ({"fd": 0.0}, {}),
           **common)
  assert calls == []


def test_resume_after_an_evaluation_on_a_save_step_matches_the_unbroken_run(tmp_path, digits_config):
  """A save at a step with an evaluation holds that evaluation's best and count, so a run killed
  after it counts evaluations like the unbroken run (and stops early at the same step)."""
  exp = setup.build(digits_config, str(tmp_path), evaluator=False)
  objective = objective_for(exp, 100)
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=True)
  settings = loop.Settings(num_steps=40, log_every=2, save_every=2, eval_every=2,
                           early_stopping_patience=2)
  scores = {2: 5.0, 4: 4.0, 6: 4.5, 8: 4.6, 10: 4.7}

  def evaluate(params, step, crash_at=None):
    if step == crash_at:
      raise KeyboardInterrupt
    return {"fd": scores[step]}, {}

  def run(workdir, **kw):
    return loop.run(objective, settings, workdir=workdir, mesh=exp.mesh, train_data=exp.train_data(),
                    writer=writer, best_metric="fd", evaluate=lambda p, s: evaluate(p, s, **kw))
  run(str(tmp_path / "unbroken"))
  with pytest.raises(KeyboardInterrupt):
    run(str(tmp_path / "resumed"), crash_at=6)      # killed after the save of step 4
  run(str(tmp_path / "resumed"))
  metas = [ckpt_lib.read_meta(str(tmp_path / d / "checkpoints")) for d in ("unbroken", "resumed")]
  assert metas[0]["step"] == metas[1]["step"] == 8 and metas[0]["stopped_early"]
  for key in ("best", "evals_since_best", "stopped_early"):
    assert metas[0][key] == metas[1][key], key
