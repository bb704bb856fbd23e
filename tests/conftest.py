import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from jdistill.config import base_config  # noqa: E402


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
