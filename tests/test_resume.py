"""A run directory keeps one config; a model says what it means (parameterization, schedule,
conditioning); damaged checkpoints and teachers are named, and a damaged newest step falls back to
the intact one before it."""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_unet

from jdistill import methods, resume
from jdistill.errors import ConfigError
from jdistill.methods import progressive, teacher
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import setup, teachers


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A 4-step tiny teacher run with checkpoints at steps 2 and 4, and its config."""
  config = tiny_unet(teacher.get_config("digits"))
  config.data.batch_size = 16
  config.train.update(num_steps=4, log_every=2, save_every=2, eval_every=0)
  config.eval.update(num_samples=64, final_steps=(2,), steps_during_training=(2,), batch_size=64)
  workdir = str(tmp_path_factory.mktemp("teacher_run"))
  methods.train(config, workdir)
  return config, workdir


def test_resume_with_a_changed_field_is_refused_naming_it_and_keeps_config_json(teacher_run):
  config, workdir = teacher_run
  stored = open(f"{workdir}/config.json").read()
  changed = config.copy_and_resolve_references()
  changed.optim.lr = 5e-4
  changed.diffusion.parameterization = "eps"
  with pytest.raises(ConfigError) as error:
    methods.train(changed, workdir)
  message = str(error.value)
  assert "config.optim.lr: 0.001 in the run, 0.0005 now" in message
  assert "config.diffusion.parameterization: 'v' in the run, 'eps' now" in message
  assert "--allow_config_changes=diffusion.parameterization,optim.lr" in message
  assert open(f"{workdir}/config.json").read() == stored      # nothing overwritten


def test_cadences_sample_counts_and_named_changes_may_change_on_resume(teacher_run):
  config, workdir = teacher_run
  changed = config.copy_and_resolve_references()
  changed.train.log_every = 1
  changed.eval.num_samples = 128
  changed.mesh.fsdp = 2
  resume.check_config(changed, workdir)                       # no error
  changed.train.num_steps = 8
  with pytest.raises(ConfigError, match="config.train.num_steps: 4 in the run, 8 now"):
    resume.check_config(changed, workdir)
  resume.check_config(changed, workdir, allowed=["train.num_steps"])
  with pytest.raises(ConfigError, match="train.num_step is not a config field"):
    resume.check_config(changed, workdir, allowed=["train.num_step"])


def test_a_workdir_without_checkpoints_is_a_fresh_run(tmp_path, teacher_run):
  config, workdir = teacher_run
  with open(f"{workdir}/config.json") as f:
    (tmp_path / "config.json").write_text(f.read())
  changed = config.copy_and_resolve_references()
  changed.optim.lr = 1.0
  resume.check_config(changed, str(tmp_path))                 # a run that failed before training


def test_checkpoints_carry_the_model_card_and_a_teacher_of_another_parameterization_is_refused(
    teacher_run):
  config, workdir = teacher_run
  meta = ckpt_lib.read_meta(f"{workdir}/checkpoints")
  assert meta["model_card"] == {"diffusion.path": "vp", "diffusion.parameterization": "v",
                                "diffusion.schedule": {"name": "cosine"},
                                "model.num_classes": 0, "model.time_input": "logsnr"}
  student = config.copy_and_resolve_references()
  exp = setup.build(student, workdir + "_check", evaluator=False, record_config=False)
  abstract = exp.abstract_params()
  teachers.load_checkpoint(workdir, abstract, student)        # the same model: loads
  student.diffusion.parameterization = "eps"
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    teachers.load_checkpoint(workdir, abstract, student)
  assert "diffusion.parameterization='v'" in str(error.value)
  assert "config.diffusion.parameterization='eps'" in str(error.value)
  student.diffusion.parameterization = "v"
  student.diffusion.schedule.name = "linear"
  with pytest.raises(ckpt_lib.CheckpointError, match="diffusion.schedule"):
    teachers.load_checkpoint(f"{workdir}/teacher.msgpack", abstract, student)   # its export too


def test_nan_and_truncated_teachers_are_named(teacher_run, tmp_path):
  config, workdir = teacher_run
  exp = setup.build(config, str(tmp_path), evaluator=False, record_config=False)
  abstract = exp.abstract_params()
  params = teachers.load_checkpoint(f"{workdir}/teacher.msgpack", abstract, config)
  poisoned = jax.tree.map(lambda x: x, params)
  poisoned["Conv_0"]["bias"] = poisoned["Conv_0"]["bias"].at[0].set(jnp.nan)
  teachers.export(poisoned, config, str(tmp_path / "nan.msgpack"), {"mode": "ddim", "steps": 2})
  with pytest.raises(ckpt_lib.CheckpointError, match=r"1 params hold NaN/Inf \(\['Conv_0'\]\['bias'\]\)"):
    teachers.load_checkpoint(str(tmp_path / "nan.msgpack"), abstract, config)
  data = open(f"{workdir}/teacher.msgpack", "rb").read()
  (tmp_path / "cut.msgpack").write_bytes(data[:len(data) // 2])
  (tmp_path / "cut.json").write_text(open(f"{workdir}/teacher.json").read())
  with pytest.raises(ckpt_lib.CheckpointError, match="cut.msgpack is not a readable .msgpack"):
    teachers.load_checkpoint(str(tmp_path / "cut.msgpack"), abstract, config)


def _damage(step_dir):
  for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _tiny_checkpoints(directory):
  manager = ckpt_lib.manager(str(directory), asynchronous=False)
  for step in (2, 4):
    ckpt_lib.save(manager, step, {"w": jnp.full((3,), float(step))}, {"step": step})
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  return abstract


def test_a_damaged_newest_step_falls_back_to_the_intact_one(tmp_path):
  abstract = _tiny_checkpoints(tmp_path)
  _damage(tmp_path / "4")
  state, meta = ckpt_lib.restore(ckpt_lib.manager(str(tmp_path)), abstract)
  assert meta["step"] == 2 and np.array_equal(state["w"], [2.0, 2.0, 2.0])
  assert sorted(os.listdir(tmp_path)) == ["2", "4.corrupt"]  # set aside: step 4 can be saved again
  manager = ckpt_lib.manager(str(tmp_path), asynchronous=False)
  ckpt_lib.save(manager, 4, {"w": jnp.zeros(3)}, {"step": 4})
  assert manager.all_steps() == [2, 4]


def test_when_every_step_is_damaged_each_is_named(tmp_path):
  abstract = _tiny_checkpoints(tmp_path)
  _damage(tmp_path / "4")
  _damage(tmp_path / "2")
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    ckpt_lib.restore(ckpt_lib.manager(str(tmp_path)), abstract)
  assert "step 4: " in str(error.value) and "step 2: " in str(error.value)
  assert "different model or method config?" not in str(error.value)


class _Evaluator:
  final_reuses_training_count = False

  def __init__(self, fd):
    self.fd = fd

  def evaluate(self, params, steps, mode="ddim", final=False, grid=None):
    return {"fd": self.fd}, np.zeros((4, 8, 8, 1), np.float32)

  def speed(self, result, params, steps, mode="ddim"):
    return 1.0


class _Writer:
  def write_scalars(self, step, scalars):
    pass


def test_a_stage_result_is_reused_only_if_evaluated_the_same_way(tmp_path):
  from jdistill.config import base_config
  config = base_config("digits")
  exp = type("Exp", (), {})()
  exp.config, exp.writer, exp.evaluator = config, _Writer(), _Evaluator(fd=7.0)
  row = progressive.stage_row(exp, str(tmp_path), 0, 2, None, None, 2.0, {})
  assert row["student_fd"] == 7.0
  exp.evaluator = _Evaluator(fd=3.0)
  assert progressive.stage_row(exp, str(tmp_path), 0, 2, None, None, 2.0, {})["student_fd"] == 7.0
  config.eval.num_samples = 2000                               # now evaluated on more samples
  row = progressive.stage_row(exp, str(tmp_path), 0, 2, None, None, 2.0, {})
  assert row["student_fd"] == 3.0 and row["ddim_fd"] == 3.0
  assert json.load(open(tmp_path / "result.json"))["student_fd"] == 3.0


def test_a_field_added_since_the_run_is_unchanged_at_its_default(tmp_path, teacher_run):
  config, workdir = teacher_run
  stored = json.load(open(f"{workdir}/config.json"))
  del stored["diffusion"]["schedule"]["zero_terminal_snr"]       # a run of an older jdistill
  (tmp_path / "config.json").write_text(json.dumps(stored))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  defaults = teacher.get_config("digits")
  resume.check_config(config, str(tmp_path), defaults=defaults)
  changed = config.copy_and_resolve_references()
  changed.diffusion.schedule.update(name="linear", zero_terminal_snr=True)
  with pytest.raises(ConfigError, match="zero_terminal_snr: None in the run, True now"):
    resume.check_config(changed, str(tmp_path), defaults=defaults)


def test_a_retired_field_at_its_neutral_value_resumes_and_any_other_is_named(tmp_path):
  """dmd.remat (replaced by train.remat): a run that stored False resumes; True is a change."""
  from jdistill.methods import distribution_matching as dm_method
  config = dm_method.get_config("digits", "dmd2")
  stored = json.loads(config.to_json_best_effort())
  stored["dmd"]["remat"] = False                                   # a run of an older jdistill
  (tmp_path / "config.json").write_text(json.dumps(stored))
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  resume.check_config(config, str(tmp_path))
  stored["dmd"]["remat"] = True
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(ConfigError, match=r"dmd.remat: True in the run, '\(replaced by train.remat\)'"):
    resume.check_config(config, str(tmp_path))
