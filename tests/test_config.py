"""Config validation (fails fast naming the field, also from the command line) and the progressive
distillation schedule parsing."""
import logging
import os
import subprocess
import sys

import pytest

from configs import progressive as progressive_config
from configs import teacher as teacher_config
from jdistill.config import base_config
from jdistill.errors import ConfigError
from jdistill.methods import validate
from jdistill.methods.progressive import ScheduleError, stage_train_steps, step_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- validate

@pytest.mark.parametrize("preset", ["digits", "toy2d", "digits_flow"])
def test_valid_cpu_configs_pass(preset):
  validate(base_config(preset), 1)
  validate(teacher_config.get_config(preset), 2)
  validate(progressive_config.get_config(preset), 4)


def test_valid_tfds_config_passes_with_weights_file(tmp_path):
  weights = tmp_path / "inception.npz"
  weights.write_bytes(b"x")
  config = base_config("cifar10")
  config.eval.inception_weights = str(weights)
  validate(config, 8)


def _mutations():
  def set_(path, value):
    def apply(c):
      *parents, leaf = path.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
    return apply

  def tfds_missing(c):
    c.data.source = "tfds"
    c.data.name = "no_such_dataset_xyz"

  def no_inception_weights(c):
    c.eval.features = "inception"
    c.eval.inception_weights = ""

  def missing_inception_weights(c):
    c.eval.features = "inception"
    c.eval.inception_weights = "/nonexistent/inception_fid.npz"

  def fsdp_not_dividing(c):
    c.data.batch_size = 126           # divisible by the 3 devices: only fsdp is wrong
    c.mesh.fsdp = 2

  def tfds_tests_on_training_data(c):
    c.data.update(source="tfds", name="mnist", test_split="train")

  return [
      ("diffusion.schedule.name", set_("diffusion.schedule.name", "sigmoidish"), 1),
      ("optim.lr", set_("optim.lr", -1e-3), 1),
      ("optim.lr", set_("optim.lr", 0.0), 1),
      ("data.batch_size", set_("data.batch_size", 128), 3),
      ("data.batch_size", set_("data.batch_size", 0), 1),
      ("data.name", tfds_missing, 1),
      ("diffusion.parameterization", set_("diffusion.parameterization", "score"), 1),
      ("diffusion.loss_weighting", set_("diffusion.loss_weighting", "bogus"), 1),
      ("mesh.fsdp", fsdp_not_dividing, 3),
      ("eval.inception_weights", no_inception_weights, 1),
      ("eval.inception_weights", missing_inception_weights, 1),
      ("optim.name", set_("optim.name", "sgd9"), 1),
      ("optim.ema_decay", set_("optim.ema_decay", 1.0), 1),
      ("train.num_steps", set_("train.num_steps", 0), 1),
      ("train.remat", set_("train.remat", "everything"), 1),
      ("model.name", set_("model.name", "transformer"), 1),
      ("data.source", set_("data.source", "s3"), 1),
      ("data.path", lambda c: c.data.update(source="image_folder", path="/nonexistent/imgs"), 1),
      ("eval.num_samples", set_("eval.num_samples", 1), 1),
      ("eval.final_num_samples", set_("eval.final_num_samples", -5), 1),
      ("eval.num_samples", set_("eval.num_samples", 0), 1),
      ("eval.batch_size", set_("eval.batch_size", 0), 1),
      ("eval.batch_size", set_("eval.batch_size", -4), 1),
      ("eval.steps_during_training", set_("eval.steps_during_training", (8, 0)), 1),
      ("eval.steps_during_training", set_("eval.steps_during_training", ()), 1),
      ("eval.final_steps", set_("eval.final_steps", (4, -1)), 1),
      ("eval.final_steps", set_("eval.final_steps", ()), 1),
      ("teacher.sampling_steps", set_("teacher.sampling_steps", 0), 1),
      ("data.batch_size", set_("data.batch_size", -8), 1),
      ("data.resolution", set_("data.resolution", -8), 1),
      ("data.test_split", tfds_tests_on_training_data, 1),
      ("train.log_every", set_("train.log_every", 0), 1),
      ("train.save_every", set_("train.save_every", -1), 1),
      ("train.eval_every", set_("train.eval_every", -1), 1),
      ("optim.final_lr_fraction", set_("optim.final_lr_fraction", -0.5), 1),
      ("diffusion.schedule.zero_terminal_snr", set_("diffusion.schedule.zero_terminal_snr", True), 1),
      ("optim.final_lr_fraction", set_("optim.final_lr_fraction", 1.5), 1),
      ("diffusion.schedule.num_train_timesteps", set_("diffusion.schedule.num_train_timesteps", 0), 1),
      ("diffusion.schedule.shift", set_("diffusion.schedule.shift", 3.0), 1),   # not a flow
      ("diffusion.schedule.shift", lambda c: c.diffusion.schedule.update(name="flow", shift=0.0), 1),
      ("model.time_input", set_("model.time_input", "sigma"), 1),
      ("model.time_input", set_("model.time_input", "t1000"), 1),             # a VP model
      ("model.time_input", set_("model.time_input", "ddpm_timestep"), 1),     # cosine: no table
      ("model.time_input", lambda c: c.update(dict(model=dict(time_input="ddpm_timestep"),
                                                   diffusion=dict(schedule=dict(name="flow")))), 1),
      ("diffusion.time_sampling", set_("diffusion.time_sampling", "beta"), 1),
      ("diffusion.logit_std", set_("diffusion.logit_std", 0.0), 1),
      ("diffusion.time_sampling", lambda c: (c.diffusion.update(time_sampling="logit_normal"),
                                             c.curriculum.update(sampler="adaptive")), 1),
  ]


@pytest.mark.parametrize("field,mutate,num_devices", _mutations(),
                         ids=[f"{m[0]}-{i}" for i, m in enumerate(_mutations())])
def test_invalid_field_is_named(field, mutate, num_devices):
  config = base_config("digits")
  validate(config, 1)                   # the unmodified config is valid
  mutate(config)
  with pytest.raises(ConfigError) as info:
    validate(config, num_devices)
  assert f"config.{field}" in str(info.value)
  assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("field,update", [
    ("data.test_split", dict(test_split="missing")),
    ("data.train_split", dict(train_split="all")),
    ("data.test_split", dict(test_split="train")),
    ("data.resolution", dict(resolution=0)),
])
def test_invalid_image_folder_field_is_named(tmp_path, field, update):
  """Each split is its own folder under data.path, never the training one, checked up front."""
  (tmp_path / "train").mkdir()
  (tmp_path / "test").mkdir()
  config = base_config("digits")
  config.data.update(source="image_folder", path=str(tmp_path), resolution=8)
  validate(config, 1)
  config.data.update(**update)
  with pytest.raises(ConfigError, match=f"^config.{field}: "):
    validate(config, 1)


def test_batch_divisible_by_devices():
  config = base_config("digits")
  config.data.batch_size = 129
  validate(config, 3)                   # 129 = 3 * 43
  with pytest.raises(ConfigError, match=r"config\.data\.batch_size"):
    validate(config, 2)


def test_unknown_preset():
  with pytest.raises(ConfigError, match="preset"):
    base_config("celeba")


def test_command_line_fails_before_compute(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "jdistill.main", "--config=configs/teacher.py",
       f"--workdir={workdir}", "--config.optim.lr=-1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "ConfigError" in result.stderr
  assert "config.optim.lr" in result.stderr
  assert not workdir.exists()          # nothing written: no checkpoints, no logs
  assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- progressive schedule

def progressive(steps="", two_step=True, **kwargs):
  config = progressive_config.get_config()
  config.progressive.steps = steps
  config.progressive.two_step = two_step
  config.progressive.stage_overrides = ""      # the digits preset's 6-stage overrides: none here
  config.progressive.update(kwargs)
  return config


@pytest.fixture
def warnings_log(caplog):
  caplog.set_level(logging.WARNING)
  return caplog


def _schedule_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and "progressive stage" in r.getMessage()]


def test_short_from_scratch_run_warns_about_its_ema(warnings_log):
  """decay^N is the random init's weight in the final EMA: 0.9995^2000 = 37% is warned about."""
  ema_warnings = lambda: [r.getMessage() for r in warnings_log.records if "EMA" in r.getMessage()]
  config = teacher_config.get_config("digits")
  validate(config, 1)                                  # 16000 steps: 0.9995^16000 = 0.03%
  assert ema_warnings() == []
  config.train.num_steps = 2000
  validate(config, 1)
  assert len(ema_warnings()) == 1 and "37% of the random initialisation" in ema_warnings()[0]
  assert "0.9977" in ema_warnings()[0]                 # 0.01 ** (1 / 2000)
  config.optim.ema_warmup = True                       # decay 1/10 at the first update: no init left
  validate(config, 1)
  assert len(ema_warnings()) == 1
  config.optim.ema_warmup = False
  config.teacher.checkpoint = "runs/teacher/teacher.msgpack"   # a fine-tune starts from a teacher
  validate(config, 1)
  assert len(ema_warnings()) == 1


def test_default_schedule_halves(warnings_log):
  assert step_schedule(progressive(), 8) == [8, 4, 2, 1]
  assert step_schedule(progressive(), 2) == [2, 1]
  assert step_schedule(progressive(), 64) == [64, 32, 16, 8, 4, 2, 1]
  assert _schedule_warnings(warnings_log) == []


def test_explicit_schedule_near_two_is_quiet(warnings_log):
  assert step_schedule(progressive("25,13,7,4,2,1"), 64) == [25, 13, 7, 4, 2, 1]
  assert step_schedule(progressive(" 8, 4 ,2,1 "), 64) == [8, 4, 2, 1]
  assert _schedule_warnings(warnings_log) == []


@pytest.mark.parametrize("steps,two_step,message", [
    ("16,4,2,1", True, r"stage 0 \(16 -> 4 steps\) cannot nest: .* 16 steps distil into 8"),
    ("8,4,3,1", True, r"stage 1 \(4 -> 3 steps\) cannot nest: .* 4 steps distil into 2"),
    ("25,12,6", True, r"stage 0 \(25 -> 12 steps\) cannot nest: .* 25 steps distil into 13; "
                      r"the chain from 25 is \[25, 13, 7, 4, 2, 1\]"),
    ("16,5,1", False, r"stage 0 \(16 -> 5 steps\) cannot nest: the direct variant's students sit "
                      r"on grids of the halving chain from 16, \[16, 8, 4, 2, 1\]"),
])
def test_schedule_that_cannot_nest_is_refused(steps, two_step, message):
  with pytest.raises(ScheduleError, match=r"config\.progressive\.steps: " + message):
    step_schedule(progressive(steps, two_step=two_step), 64)


def test_direct_variant_may_skip_counts_of_the_halving_chain(warnings_log):
  assert step_schedule(progressive("16,4,2,1", two_step=False), 64) == [16, 4, 2, 1]
  assert step_schedule(progressive("25,7,1", two_step=False), 64) == [25, 7, 1]
  assert _schedule_warnings(warnings_log) == []


@pytest.mark.parametrize("steps,teacher_steps,message", [
    ("4,8", 8, "strictly decrease"),
    ("8,4,4,2", 8, "strictly decrease"),
    ("4,2,0", 8, ">= 1"),
    ("4,-2", 8, ">= 1"),
    ("", 6, "power of two"),
    ("", 1, "power of two"),
    ("4", 8, "at least one student"),
    ("4,two,1", 8, "not a list of integers"),
    ("4.0,2", 8, "not a list of integers"),
])
def test_bad_schedules(steps, teacher_steps, message):
  with pytest.raises(ScheduleError, match=message) as info:
    step_schedule(progressive(steps), teacher_steps)
  assert "config." in str(info.value)
  assert isinstance(info.value, ValueError)


def test_empty_schedule_error_names_teacher_steps():
  with pytest.raises(ScheduleError, match=r"config\.teacher\.sampling_steps=6"):
    step_schedule(progressive(""), 6)


def test_stage_train_steps_overrides():
  config = progressive(steps_per_stage=10, stage_overrides="0:30,2:50")
  assert stage_train_steps(config, 3, 1297) == [30, 10, 50]
  config.progressive.stage_overrides = " 1 : 7 "
  assert stage_train_steps(config, 3, 1297) == [10, 7, 10]
  config.progressive.stage_overrides = ""
  assert stage_train_steps(config, 4, 1297) == [10, 10, 10, 10]


def test_stage_train_steps_epochs():
  config = progressive(steps_per_stage=10, epochs_per_stage=2.0)
  config.data.batch_size = 128
  assert stage_train_steps(config, 3, 1297) == [20, 20, 20]     # round(2 * 1297 / 128) = 20
  config.progressive.stage_overrides = "1:5"
  assert stage_train_steps(config, 3, 1297) == [20, 5, 20]
  config.progressive.update(epochs_per_stage=0.01, stage_overrides="")
  assert stage_train_steps(config, 2, 1297) == [1, 1]           # at least one step


@pytest.mark.parametrize("overrides", ["5:10", "3:10", "-1:10", "1:0", "x", "1", "1:2:3", "a:b"])
def test_stage_train_steps_bad_overrides(overrides):
  config = progressive(steps_per_stage=10, stage_overrides=overrides)
  with pytest.raises(ScheduleError, match=r"config\.progressive\.stage_overrides"):
    stage_train_steps(config, 3, 1297)


def test_stage_train_steps_bad_steps_per_stage():
  with pytest.raises(ScheduleError, match=r"steps_per_stage"):
    stage_train_steps(progressive(steps_per_stage=0), 3, 1297)


def test_digits_preset_stage_budget():
  config = progressive_config.get_config()
  assert stage_train_steps(config, 6, 1297) == [300, 300, 400, 600, 900, 1400]
  config.progressive.steps = "8,4,2,1"
  with pytest.raises(ScheduleError, match="clear them with --config.progressive.stage_overrides="):
    stage_train_steps(config, 3, 1297)


@pytest.mark.parametrize("field,value", [
    ("variant", "dmd3"), ("generator_steps", 0), ("generator_steps", 17),
    ("critic_updates_per_generator", 0), ("t_min", 0.99), ("critic_lr", 0.0),
    ("unify_steps", (1, 2, 32)), ("critic_weighting", "l3"), ("regression_source", "noise"),
    ("regression_steps", 0),
])
def test_invalid_distribution_matching_field_is_named(field, value):
  from jdistill.methods import distribution_matching as dm_method
  config = dm_method.get_config("digits", "tdm")
  validate(config, 1)
  config.dmd[field] = value
  with pytest.raises(ConfigError, match=f"config.dmd.{field}"):
    validate(config, 1)


def test_step_aware_critic_ids_must_fit_the_step_table():
  from jdistill.methods import distribution_matching as dm_method
  config = dm_method.get_config("digits", "tdm")
  config.dmd.unify_steps = (4, 8, 16)          # 28 (K, k) ids > 16 table rows
  with pytest.raises(ConfigError, match=r"config.dmd.step_aware_critic: .*\[4, 8, 16\] sum to 28 > 16"):
    validate(config, 1)
  config.dmd.step_aware_critic = False         # the critic told K only: fits
  validate(config, 1)


def test_unify_steps_from_the_command_line(tmp_path):
  """A tuple override reaches validation from the command line, which fails before any compute."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-m", "jdistill.main", "--config=configs/tdm.py", f"--workdir={tmp_path}",
       "--config.dmd.unify_steps=(1,2,32)"], cwd=repo, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu"))
  assert out.returncode != 0
  assert "config.dmd.unify_steps: step counts must be in 1..16, got (1, 2, 32)" in out.stderr


@pytest.mark.parametrize("preset, teacher_steps, lr", [("cifar10", 8192, 5e-5), ("imagenet64", 1024, 1e-4)])
def test_paper_progressive_presets_take_the_released_distillation_settings(preset, teacher_steps, lr):
  """google-research diffusion_distillation cifar_distill.py / imagenet64_distill.py."""
  config = progressive_config.get_config(preset)
  assert config.teacher.sampling_steps == teacher_steps and config.optim.lr == lr
  assert config.progressive.steps_per_stage == 50_000 and config.optim.ema_decay == 0.0
  assert config.model.dropout == 0.0 and config.optim.schedule == "linear"
  assert config.optim.final_lr_fraction == 0.0 and config.optim.warmup_steps == 0
