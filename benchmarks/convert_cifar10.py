"""Converting a 35.7M-parameter diffusers teacher: a random-weight UNet2DModel in
google/ddpm-cifar10-32's layout (no weights are downloaded), through `python -m jdistill.convert`
in its own process: its wall time and peak host memory, then the converted network's output
against PyTorch's (max-abs over a batch at several timesteps, float32).

  python benchmarks/convert_cifar10.py        # about 2 minutes on 2 CPU cores

With `--distill_steps=N` it then distils the converted teacher for N train steps of one
progressive stage (4 -> 2 DDIM steps) on TFDS's mock CIFAR-10 (`tfds.testing.mock_data`: random
images, nothing downloaded) through `methods.train`, `--config.teacher.checkpoint` as a user
gives it, and records the stage's wall time and train-step rate.

Writes benchmarks/results/convert_cifar10.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DDPM_CIFAR10 = dict(    # google/ddpm-cifar10-32's config.json
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                          "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    norm_eps=1e-6, norm_num_groups=32)


def distil(teacher: str, train_steps: int, tmp: str) -> dict:
  """One progressive stage (4 -> 2 steps, `train_steps` steps, batch 8) from the converted teacher
  on mock CIFAR-10; its wall time and the loop's steps per second."""
  import tensorflow_datasets as tfds
  import configs.progressive as progressive_config
  from jdistill import methods
  from jdistill.train import teachers
  config = progressive_config.get_config("cifar10")
  config.teacher.update(checkpoint=teacher, sampling_steps=4)     # FD (teacher): its 4 steps
  config.data.update(batch_size=8, data_dir=os.path.join(tmp, "tfds"))
  config.progressive.update(steps="4,2", steps_per_stage=train_steps, eval_every=0,
                            validation_examples=8)
  config.train.update(log_every=max(1, train_steps // 5), save_every=train_steps)
  config.eval.update(features="raw", num_samples=16, final_num_samples=16, batch_size=16,
                     steps_during_training=(2,), final_steps=(2,), neighbour_examples=16)
  workdir = os.path.join(tmp, "pd")
  start = time.perf_counter()
  with tfds.testing.mock_data(num_examples=64):
    methods.train(config, workdir)
  seconds = time.perf_counter() - start
  exported = teachers.read_export(os.path.join(workdir, "student.msgpack"))
  return dict(distill_train_steps=train_steps, distill_batch=8, distill_seconds=round(seconds, 1),
              distilled_student=f"{exported['model']['name']}, {exported['sampling']['steps']} "
                                "DDIM steps")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--timesteps", default="0,500,999")
  parser.add_argument("--distill_steps", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "convert_cifar10.json"))
  args = parser.parse_args()
  import numpy as np
  import torch
  from diffusers import DDPMScheduler, UNet2DModel
  torch.manual_seed(0)
  model = UNet2DModel(**DDPM_CIFAR10).eval()
  num_params = sum(p.numel() for p in model.parameters())
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(os.path.join(tmp, "unet"))
    DDPMScheduler(num_train_timesteps=1000).save_config(os.path.join(tmp, "scheduler"))
    teacher = os.path.join(tmp, "teacher.msgpack")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jdistill.convert", f"--diffusers={tmp}/unet",
                    f"--scheduler={tmp}/scheduler", f"--out={teacher}"], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    import jax
    from flax import serialization
    from jdistill.models import diffusers_unet
    with open(teacher, "rb") as f:
      params = serialization.msgpack_restore(f.read())
    with open(teacher.replace(".msgpack", ".json")) as f:
      module = diffusers_unet.from_config(json.load(f)["model"]["diffusers"])
    rng = np.random.RandomState(0)
    timesteps = [float(t) for t in args.timesteps.split(",")]
    x = rng.randn(args.batch * len(timesteps), 32, 32, 3).astype(np.float32)
    t = np.repeat(np.asarray(timesteps, np.float32), args.batch)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, x, t))
    with torch.no_grad():
      theirs = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
    error = float(np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1)).max())
    distilled = distil(teacher, args.distill_steps, tmp) if args.distill_steps else {}
  result = dict(params_millions=round(num_params / 1e6, 2), convert_seconds=round(seconds, 1),
                convert_peak_host_mib=round(peak_mib), weights_mib=round(num_params * 4 / 2**20),
                max_abs_error=error, output_max_abs=float(np.abs(ours).max()),
                inputs=len(x), timesteps=timesteps, **distilled)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
