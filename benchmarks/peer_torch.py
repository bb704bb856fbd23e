"""The PyTorch peer: jdistill's U-Net rebuilt with diffusers' `UNet2DModel` and the same three train
steps, eager or under `torch.compile`. Install with `pip install -e ".[bench]"` (on a CPU-only
machine install the CPU torch wheel first, see benchmarks/README.md).

The architecture matches jdistill/models/unet.py block for block (same parameter count): conv_in;
per level `num_res_blocks` ResNet blocks (GroupNorm, SiLU, 3x3 conv, + Linear(SiLU(emb)),
GroupNorm, SiLU, 3x3 conv, 1x1 shortcut when channels change), one-head self-attention with
GroupNorm after each block at the attention resolutions (AttnDown/AttnUpBlock2D), a stride-2 3x3
conv between levels; mid block ResNet-attention-ResNet; up path with `num_res_blocks + 1` blocks
on concatenated skips, nearest 2x + 3x3 conv; GroupNorm, SiLU, 3x3 conv_out. The time embedding is
jdistill's: sinusoids (sin, cos; no frequency shift) of t' = 1000 arctan(exp(-logsnr / 2)) / (pi / 2),
then Linear-SiLU-Linear to 4 x channels. Only GroupNorm's epsilon differs (1e-5 vs Flax's 1e-6).

Each step does the same work as the jdistill objective (v-prediction, cosine logSNR schedule):
  teacher      t ~ U(0, 1), z_t = alpha_t x + sigma_t eps, one forward + backward of
               (1 + SNR) ||x_hat - x||^2, then the update.
  progressive  a 4-step student: i ~ U{0..3}, t = (i + 1) / 4, s = i / 4; two DDIM steps of the
               frozen teacher t -> (t + s) / 2 -> s without gradient (2 forwards); the target x~;
               student forward + backward of max(SNR, 1) ||x_hat - x~||^2; the update.
  dmd          DMD2, 1-step generator, one critic and one generator update per step:
               x_g = G(noise) without gradient; critic forward + backward of its denoising loss on
               sg(x_g), critic update (Adam, no EMA); G(noise) with gradient, teacher and (updated)
               critic forwards without gradient at t ~ U[0.02, 0.98], backward of
               0.5 ||x - sg(x - grad)||^2, generator update.
  the update   clip the global grad norm to 1, skip the step if the loss is not finite (jdistill
               keeps the old state in that case), Adam (fused kernel where torch has one), EMA.
"""
from __future__ import annotations

import copy
import math

import torch
from diffusers import UNet2DModel

LOGSNR_MIN, LOGSNR_MAX = -20.0, 20.0
STUDENT_STEPS = 4


def unet(model_config, resolution: int, channels: int) -> UNet2DModel:
  """A UNet2DModel with jdistill's U-Net architecture for `config.model` at `resolution`."""
  if model_config.num_heads != 1:
    raise ValueError("the diffusers peer matches jdistill's U-Net for num_heads=1 only")
  mult = tuple(model_config.channel_mult)
  attention = [resolution // 2**level in tuple(model_config.attention_resolutions)
               for level in range(len(mult))]
  down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
  up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
  return UNet2DModel(
      sample_size=resolution, in_channels=channels, out_channels=channels,
      block_out_channels=tuple(model_config.channels * m for m in mult),
      layers_per_block=model_config.num_res_blocks, down_block_types=down, up_block_types=up,
      attention_head_dim=None, norm_num_groups=model_config.norm_groups,
      dropout=model_config.dropout, flip_sin_to_cos=False, freq_shift=0)


def num_params(module) -> int:
  return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- the diffusion math

def cosine_logsnr(t):
  b = math.atan(math.exp(-0.5 * LOGSNR_MAX))
  a = math.atan(math.exp(-0.5 * LOGSNR_MIN)) - b
  return -2.0 * torch.log(torch.tan(a * t + b))


def alpha_sigma(logsnr):
  """(alpha, sigma) shaped (B, 1, 1, 1)."""
  logsnr = logsnr[:, None, None, None]
  return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def embedding_time(logsnr):
  return torch.atan(torch.exp(-0.5 * logsnr.clamp(LOGSNR_MIN, LOGSNR_MAX))) / (0.5 * math.pi) * 1000.0


def per_example_mse(a, b):
  return (a - b).square().mean(dim=(1, 2, 3))


class Peer:
  """One of the three train steps (`kind`) on the diffusers U-Net; `step()` runs one step."""

  def __init__(self, kind: str, config, resolution: int, batch_size: int, *, dtype: str = "f32",
               compile: bool = False, device: str = None, seed: int = 0):
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)       # as XLA:CPU runs
    self.kind, self.config = kind, config
    self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    channels = 3
    self.student = unet(config.model, resolution, channels).to(self.device)
    self.params = num_params(self.student)
    self.teacher = copy.deepcopy(self.student).requires_grad_(False)
    self.ema = [p.detach().clone() for p in self.student.parameters()]
    dmd = kind == "dmd"
    optim = config.optim
    self.optimizer = self._adam(self.student.parameters(), optim.lr, optim)
    if dmd:
      self.critic = copy.deepcopy(self.student)
      self.critic_optimizer = self._adam(self.critic.parameters(), config.dmd.critic_lr, optim)
    wrap = torch.compile if compile else (lambda m: m)
    self.student_net, self.teacher_net = wrap(self.student), wrap(self.teacher)
    self.critic_net = wrap(self.critic) if dmd else None
    self.x = (torch.rand(batch_size, channels, resolution, resolution, device=self.device) * 2 - 1)
    self.step = {"teacher": self.teacher_step, "progressive": self.progressive_step,
                 "dmd": self.dmd_step}[kind]

  def _adam(self, params, lr, optim):
    params = list(params)
    try:
      return torch.optim.Adam(params, lr=lr, betas=(optim.b1, optim.b2), eps=optim.eps, fused=True)
    except (RuntimeError, TypeError, ValueError):
      return torch.optim.Adam(params, lr=lr, betas=(optim.b1, optim.b2), eps=optim.eps, foreach=True)

  def sync(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize()

  def predict(self, net, z, logsnr):
    """(x0, eps) of the v-prediction network."""
    with torch.autocast(**self.autocast):
      v = net(z, embedding_time(logsnr), return_dict=False)[0]
    v = v.float()
    alpha, sigma = alpha_sigma(logsnr)
    return alpha * z - sigma * v, sigma * z + alpha * v

  def forward_process(self, x, t):
    logsnr = cosine_logsnr(t)
    alpha, sigma = alpha_sigma(logsnr)
    return alpha * x + sigma * torch.randn_like(x), logsnr

  def update(self, loss, module, optimizer, ema=None):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(module.parameters(), self.config.optim.grad_clip, foreach=True)
    if torch.isfinite(loss):
      optimizer.step()
      if ema is not None:
        with torch.no_grad():
          torch._foreach_lerp_(ema, list(module.parameters()), 1.0 - self.config.optim.ema_decay)

  # --------------------------------------------------------------------------- the steps
  def teacher_step(self):
    x = self.x
    z_t, logsnr = self.forward_process(x, torch.rand(x.shape[0], device=self.device))
    x_hat, _ = self.predict(self.student_net, z_t, logsnr)
    loss = ((1.0 + logsnr.exp()) * per_example_mse(x_hat, x)).mean()
    self.update(loss, self.student, self.optimizer, self.ema)
    self.sync()

  def progressive_step(self):
    x = self.x
    i = torch.randint(0, STUDENT_STEPS, (x.shape[0],), device=self.device).float()
    t, s = (i + 1) / STUDENT_STEPS, i / STUDENT_STEPS
    z_t, logsnr_t = self.forward_process(x, t)
    with torch.no_grad():                      # the teacher: two DDIM steps t -> s
      z, teacher_x = z_t, None
      for j in range(2):
        t_j, t_next = t - (t - s) * j / 2, t - (t - s) * (j + 1) / 2
        teacher_x, teacher_eps = self.predict(self.teacher_net, z, cosine_logsnr(t_j))
        alpha_n, sigma_n = alpha_sigma(cosine_logsnr(t_next))
        z = alpha_n * teacher_x + sigma_n * teacher_eps
      alpha_t, sigma_t = alpha_sigma(logsnr_t)
      alpha_s, sigma_s = alpha_sigma(cosine_logsnr(s))
      ratio = sigma_s / sigma_t
      x_target = (z - ratio * z_t) / (alpha_s - ratio * alpha_t)
      x_target = torch.where((s == 0)[:, None, None, None], teacher_x, x_target)
    x_hat, _ = self.predict(self.student_net, z_t, logsnr_t)
    loss = (logsnr_t.exp().clamp(min=1.0) * per_example_mse(x_hat, x_target)).mean()
    self.update(loss, self.student, self.optimizer, self.ema)
    self.sync()

  def dmd_step(self):
    d = self.config.dmd
    batch = self.x.shape[0]
    noise = torch.randn_like(self.x)
    logsnr_1 = cosine_logsnr(torch.ones(batch, device=self.device))
    with torch.no_grad():
      x_generated, _ = self.predict(self.student_net, noise, logsnr_1)
    # the critic: denoise the generator's samples
    z_t, logsnr = self.forward_process(x_generated, torch.rand(batch, device=self.device))
    x_hat, _ = self.predict(self.critic_net, z_t, logsnr)
    critic_loss = ((1.0 + logsnr.exp()) * per_example_mse(x_hat, x_generated)).mean()
    self.update(critic_loss, self.critic, self.critic_optimizer)
    # the generator: DMD2 gradient (p_real - p_fake) / mean|p_real|
    x, _ = self.predict(self.student_net, noise, logsnr_1)
    x_detached = x.detach()
    t = d.t_min + (d.t_max - d.t_min) * torch.rand(batch, device=self.device)
    z_t, logsnr = self.forward_process(x_detached, t)
    with torch.no_grad():
      x_real, _ = self.predict(self.teacher_net, z_t, logsnr)
      x_fake, _ = self.predict(self.critic_net, z_t, logsnr)
      p_real, p_fake = x_detached - x_real, x_detached - x_fake
      normaliser = p_real.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8
      grad = torch.nan_to_num((p_real - p_fake) / normaliser)
    loss = 0.5 * (x - (x_detached - grad)).square().mean()
    self.update(loss, self.student, self.optimizer, self.ema)
    self.sync()

  def flops(self) -> float:
    """FLOPs of one step by torch's counter (matmuls, convolutions, attention; runs one step)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
      self.step()
    return float(counter.get_total_flops())
