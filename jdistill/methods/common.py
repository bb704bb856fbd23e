"""What every method's driver shares: the run skeleton (compile, initial state, best checkpoint,
the one loop fed by one Settings), the FD callback for evaluations during training, the end-of-run
FD / speed table with its metric cells and floors, the summary writer and the export of what
sampling needs."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
from absl import logging

from jdistill import config as config_lib
from jdistill import files
from jdistill.eval import evaluate as eval_lib
from jdistill.models.denoiser import is_guidance_conditioned
from jdistill.train import checkpoint as ckpt_lib
from jdistill.train import loop, teachers

# The shared training controls a method may not support: what a config sets, as the field to name.
def controls_in_use(config) -> dict:
  """{control: 'field=value'} for each optional control the config turns on."""
  used = {}
  if config.lora.rank > 0:
    used["lora"] = f"lora.rank={config.lora.rank}"
  if config.curriculum.sampler != "uniform":
    used["curriculum"] = f"curriculum.sampler={config.curriculum.sampler!r}"
  if config.diffusion.guidance:
    used["guidance"] = f"diffusion.guidance={config.diffusion.guidance}"
  if config_lib.student_guidance_range(config):
    used["student_guidance"] = f"student_guidance.w_max={config.student_guidance.w_max}"
  if config.diffusion.get("time_sampling", "uniform") != "uniform":
    used["time_sampling"] = f"diffusion.time_sampling={config.diffusion.time_sampling!r}"
  if config.features.weight_start or config.features.weight_end:
    used["features"] = (f"features.weight_start={config.features.weight_start}, "
                        f"weight_end={config.features.weight_end}")
  return used


class BestKeeper:
  """`on_best` for the loop: keeps the best-evaluated state (lower `metric`) in `directory`."""

  def __init__(self, directory: str, metric: str):
    self.metric, self.step, self.value = metric, None, None
    # synchronous: a multi-process run's async saves of two managers would share commit barriers
    self.manager = ckpt_lib.manager(directory, max_to_keep=1, asynchronous=False)

  def __call__(self, state, scalars, step):
    if step in self.manager.all_steps():      # a resumed run re-evaluating a step it had kept
      self.manager.delete(step)
    ckpt_lib.save(self.manager, step, state, {"step": step, **scalars}, force=True)
    self.step, self.value = step, scalars[self.metric]

  def wait(self):
    self.manager.wait_until_finished()


@dataclasses.dataclass
class Trained:
  state: Any
  last_eval: dict                 # the scalars of the run's last evaluation
  best: BestKeeper
  seconds: float                  # wall time of this invocation's training loop


def state_maker(objective, compiled: loop.CompiledStep) -> Callable:
  """objective.new_state(params) jitted onto the step's state shardings (a student, generator or
  fine-tune starting from given params)."""
  return jax.jit(objective.new_state, out_shardings=compiled.state_shardings)


def train(exp, objective, settings: loop.Settings, *, workdir: str, train_data, evaluate,
          best_metric: str, compiled: Optional[loop.CompiledStep] = None, frozen=None,
          frozen_shardings=None, stage=None, initial_state: Optional[Callable] = None,
          metric_prefix: str = "", global_step_offset: int = 0, meta: Optional[dict] = None):
  """One `loop.run` with the best checkpoint kept in `workdir/best`; returns `Trained`."""
  compiled = compiled or loop.compile_step(objective, exp.mesh, frozen_shardings)
  best = BestKeeper(os.path.join(workdir, "best"), best_metric)
  start = time.time()
  state, last_eval = loop.run(
      objective, settings, workdir=workdir, mesh=exp.mesh, train_data=train_data,
      writer=exp.writer, frozen=frozen, stage=stage, evaluate=evaluate, compiled=compiled,
      metric_prefix=metric_prefix, global_step_offset=global_step_offset, on_best=best,
      best_metric=best_metric, meta=dict(meta or {}, model_card=teachers.model_card(exp.config)),
      initial_state=initial_state)
  best.wait()
  return Trained(state, last_eval, best, time.time() - start)


def fd_callback(exp, steps_list, prefix: str = "", mode: str = "ddim", guidance: float = 0.0,
                grids=None):
  """evaluate(params, step) -> ({'fd_<N>steps': ..., and the evaluator's other metrics (memorised,
  precision, recall, [fd_teacher]) likewise}, {'samples': grid of the first N}) for the loop;
  `mode` is the sampler ('renoise' for DMD2 generators), `guidance` what the model takes (a
  teacher's config.diffusion.guidance; 0 for distilled students), `grids` {N: time grid} where a
  step count samples on a grid of its own (default uniform)."""
  def evaluate(params, step):
    scalars, grid = {}, None
    for n in steps_list:
      result, samples = exp.evaluator.evaluate(params, n, mode, guidance=guidance,
                                               grid=(grids or {}).get(n))
      scalars.update({f"{k}_{n}steps": v for k, v in result.items()})
      grid = eval_lib.image_grid(samples) if grid is None else grid
    logging.info("%seval at step %d: %s", prefix, step,
                 "  ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
    return scalars, {"samples": grid[None]}
  return evaluate


def fd_table(exp, params, steps_list, *, mode: str = "ddim", last_eval=None, name: str = "",
             guidance: float = 0.0, grids=None):
  """End-of-run rows {steps, fd, [swd], [fd_teacher], [memorised, precision, recall],
  ms_per_sample, seconds} on eval.final_num_samples samples; a training evaluation in `last_eval`
  of the same sample count with every metric is reused, not redone. Sample grids go to
  `<workdir>/<name>samples_<N>steps.png`. `grids`: as fd_callback's."""
  rows = []
  for n in steps_list:
    start = time.time()
    result = reused_evaluation(exp, last_eval, n)
    if result is None:
      result, samples = exp.evaluator.evaluate(params, n, mode, final=True, guidance=guidance,
                                               grid=(grids or {}).get(n))
      eval_lib.save_png(eval_lib.image_grid(samples),
                        os.path.join(exp.workdir, f"{name}samples_{n}steps.png"))
    ms = exp.evaluator.speed(result, params, n, mode, guidance)
    rows.append(dict(steps=n, **{k: v for k, v in result.items() if k != "ms_per_sample"},
                     ms_per_sample=ms, seconds=time.time() - start))
    logging.info("%s%d steps (%s): %s", name, n, mode,
                 "  ".join(f"{k}={v:.4g}" for k, v in rows[-1].items() if k != "steps"))
  return rows


def teacher_rows(exp, teacher, steps_list, guidance: float = 0.0) -> list:
  """("teacher", row) of the teacher at its own step count (config.teacher.sampling_steps), then
  at each of `steps_list` (the student's), for a summary table next to the student's rows."""
  own = exp.config.teacher.sampling_steps
  steps = [own, *(n for n in steps_list if n != own)]
  return [("teacher", row) for row in fd_table(exp, teacher, steps, name="teacher_",
                                               guidance=guidance)]


def guidance_rows(exp, teacher, teacher_steps: int, models, guidance_values) -> list:
  """End-of-run rows of guidance-conditioned students: at each w of `guidance_values`, with FD
  (teacher) to the `teacher_steps`-step CFG teacher at that w, each of `models` [(name, params,
  steps, mode, grid or None)] sampled at w (a guided student in one pass per step, the teacher in
  two). Returns [(name, steps, w, metrics with ms_per_sample and, for digits, accuracy)]."""
  rows = []
  for w in guidance_values:
    exp.evaluator.set_teacher(teacher, teacher_steps, guidance=w)
    for name, params, n, mode, grid in models:
      result, _ = exp.evaluator.evaluate(params, n, mode, final=True, guidance=w, grid=grid)
      result["ms_per_sample"] = exp.evaluator.speed(result, params, n, mode, guidance=w)
      rows.append((name, n, w, result))
      logging.info("%s, %d steps, w=%g: %s", name, n, w,
                   "  ".join(f"{k}={v:.4g}" for k, v in result.items()))
  return rows


def write_guidance_summary(exp, title: str, intro: str, rows, footer=()):
  """summary.md of `guidance_rows`: one row per model, step count and w."""
  write_summary(
      exp.workdir, title,
      [f"{intro}; metrics on {exp.evaluator.final_num_samples} samples vs the held-out split, FD "
       "(teacher) to the CFG teacher at the same w; accuracy: the share of samples the digits "
       "classifier calls the class asked for"],
      ["model", "steps", "w", *METRIC_HEADER, "accuracy", "ms / sample"],
      [[name, n, f"{w:g}", *metric_cells(r),
        "" if r.get("accuracy") is None else f"{r['accuracy']:.3f}", f"{r['ms_per_sample']:.3f}"]
       for name, n, w, r in rows],
      list(footer) + floor_lines(exp))


def write_student_guidance_summary(exp, teacher, students, title: str, intro: str, footer=()):
  """summary.md of a method's guidance-conditioned `students` [(name, params, steps, mode, grid or
  None)] next to the CFG teacher (config.teacher.sampling_steps, two passes), at each w of
  config.student_guidance.summary_w."""
  n_teacher = exp.config.teacher.sampling_steps
  models = [("CFG teacher (2 passes)", teacher, n_teacher, "ddim", None)] + list(students)
  rows = guidance_rows(exp, teacher, n_teacher, models, exp.config.student_guidance.summary_w)
  w_min, w_max = config_lib.student_guidance_range(exp.config)
  write_guidance_summary(exp, title, f"w ~ U[{w_min:g}, {w_max:g}], {intro}", rows, footer)


def reused_evaluation(exp, last_eval, n):
  """The metrics of `last_eval`'s n-step evaluation when an end-of-run table may reuse it (the
  same sample count, and FD (teacher) in it when a teacher is set), else None."""
  suffix = f"_{n}steps"
  result = {k[:-len(suffix)]: v for k, v in (last_eval or {}).items() if k.endswith(suffix)}
  if (not exp.evaluator.final_reuses_training_count or "fd" not in result
      or (exp.evaluator.teacher is not None and "fd_teacher" not in result)):
    return None
  return result


METRIC_HEADER = ("FD (data)", "FD (teacher)", "memorised", "precision", "recall")
METRIC_KEYS = ("fd", "fd_teacher", "memorised", "precision", "recall")


def metric_cells(result) -> list:
  """A table row's METRIC_HEADER cells from evaluation metrics ('' where one is absent)."""
  return [("" if result.get(k) is None else f"{result[k]:.4g}" if k.startswith("fd")
           else f"{result[k]:.3f}") for k in METRIC_KEYS]


def floor_lines(exp) -> list:
  """The summary's footer: what the metrics read for real data and for the teacher itself."""
  floors, count = exp.evaluator.floors(), exp.evaluator.final_num_samples
  lines = []
  if "fd_data" in floors:
    counted = (f"{count}" if floors["data_count"] == count
               else f"all {floors['data_count']} (fewer than {count})")
    lines.append(f"Floors: FD (data) of real training examples ({counted}) vs the held-out split: "
                 f"{floors['fd_data']:.4g}; memorised share of the held-out split itself: "
                 f"{floors['memorised']:.3f}.")
  if "fd_teacher" in floors:
    _, steps, mode, guidance = exp.evaluator.teacher
    guided = f", guidance {guidance:g}" if guidance else ""
    lines.append(f"FD (teacher) is to {count} samples of the teacher ({steps} {mode} steps{guided}, "
                 f"other noise seeds); its floor, the teacher against itself: "
                 f"{floors['fd_teacher']:.4g}.")
  return lines


def table_lines(header, rows) -> list:
  """A markdown table: header and rows of cells ('' cells stay blank)."""
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["|" + "|".join(f" {cell} " if cell != "" else " " for cell in row) + "|" for row in rows])


def write_summary(workdir: str, title: str, intro, header, rows, footer=()):
  """summary.md: a title, intro lines, a markdown table (header and rows of cells), footer lines."""
  if jax.process_index() != 0:
    return
  lines = [f"# {title}", ""] + [line for text in intro for line in (text, "")]
  lines += table_lines(header, rows)
  if footer:
    lines += [""] + list(footer)
  text = "\n".join(lines) + "\n"
  files.write_text(os.path.join(workdir, "summary.md"), text)
  logging.info("\n%s", text)


def export(params, config, path: str, mode: str, steps: int, grid=None, guidance: float = 0.0,
           adapters=None):
  """The exported model of a run: `path` (.msgpack) and its JSON, which `jdistill.sample
  --checkpoint=PATH` reads to rebuild and sample it (`mode`, `steps`, its `guidance`, whether it
  is guidance-conditioned, and its time `grid` where given) without a run directory. A LoRA
  student's `adapters` ({base, adapters}: `adapters()`; params are then merged) go next to it,
  `<name>.lora.msgpack`, with config.lora and the base in the JSON: jdistill.export writes them as
  a PEFT adapter."""
  sampling = {"mode": mode, "steps": int(steps), "guidance": float(guidance)}
  if is_guidance_conditioned(params):     # a student told its w (jdistill.sample --guidance)
    sampling["guided"] = True
  if grid is not None:
    sampling["grid"] = [float(t) for t in grid]
  lora = None
  if adapters is not None:
    lora = dict(config.lora.to_dict(), base=adapters["base"])
    teachers.write_params(lora_path(path), adapters["adapters"])
  teachers.export(params, config, path, sampling, lora)


def adapters(objective, state, base: str):
  """A LoRA objective's trained adapters (the EMA of `state`, a TrainState) with what they adapt
  (`base`, said in the export's JSON); None for a full-weight one."""
  if getattr(objective, "lora", None) is None:
    return None
  return {"base": base, "adapters": state.ema_params}


def lora_path(path: str) -> str:
  """Where the LoRA adapters of the exported model `path` (.msgpack) are."""
  return path.replace(".msgpack", ".lora.msgpack")
