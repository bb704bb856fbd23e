"""Distribution matching distillation: DMD2 (Yin et al. 2024) and TDM (Luo et al. 2025).

Three networks: the generator G (the few-step student, initialised from the teacher), the frozen
teacher (the real score) and a fake-score critic (initialised from the teacher, trained to denoise
G's current samples). Two optimizers; the critic takes `critic_updates_per_generator` steps per
generator step (two time-scales).

A K-step generator maps z at t_k = (K - k) / K to x. Backward simulation: k_i ~ U{0..K-1} per
example and z_{t_k} comes from k generator steps run without gradient (DMD2 re-noises each x_hat
with fresh noise; TDM follows its own deterministic DDIM trajectory). Only the last step trains.
Variants: 'dmd2'; 'tdm' (the paper's and its official code's objective); 'tdm_fresh_noise' (the
project's earlier TDM: DMD2's diffusion of x_hat with fresh noise, restricted to [s_k, t_k]).
TDM-unify (beyond the papers): with `unify_steps` = (1, 2, 4), K itself is drawn per example and
both the generator and the critic are told K (a zero-initialised step embedding), so one
generator samples well with each K.

DMD2 generator step, x = G(z_{t_k}):
  t ~ U[t_min, t_max],  z_t = alpha_t x + sigma_t eps,
  x_real = teacher(z_t) (classifier-free guided if conditional),  x_fake = critic(z_t),
  p_real = x - x_real,  p_fake = x - x_fake,  grad = (p_real - p_fake) / mean|p_real|  (per example),
  loss = 0.5 ||x - sg(x - grad)||^2   (its gradient w.r.t. x is `grad`)
  [+ regression to the teacher's ODE trajectory from stored noise (DMD1: G(noise) -> the
     teacher's sample; K > 1: step k from the teacher's z_{t_k} onto its z_{s_k}; a fixed set of
     pairs computed once before training, `regression_pairs`; or `regression_source='data'`:
     step k from data noised to t_k onto the teacher's segment run online, fresh every step)]
  [+ non-saturating GAN loss from a head on the critic's bottleneck features]
TDM generator step, (x_hat, eps_hat) = G(z_{t_k}), s = s_k = t_k - 1/K:
  z_s = alpha_s x_hat + sigma_s eps_hat (the student's trajectory state; z_0 = x_hat),
  t ~ U[s, t_k],  z_t = (alpha_t / alpha_s) z_s + sigma_{t|s} eps  (`diffuse_trajectory_state`),
  target = sg(x_hat + (x_real - x_fake)),  loss = pseudo_huber_c(x_hat - target) / sg(mean|x_hat - x_real|)
  ('tdm_fresh_noise': z_t = alpha_t x_hat + sigma_t eps instead; the two agree at the last step).
Critic step: a denoising loss on sg(G samples), weighted by `critic_weighting`: DMD2 the
  teacher's (v_mse), TDM x0-MSE x min(SNR, gamma) (min_snr, gamma = config.diffusion.min_snr_gamma),
  'tdm' also by the importance weight of its noise (`trajectory_importance_weight`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdistill.diffusion.losses import per_example_mse, weighted_x_loss
from jdistill.diffusion.parameterization import broadcast_to_data, clip_x0, forward_process
from jdistill.diffusion.sampling import (ddim_segment, ddim_step, ddim_x_target, renoise_step,
                                         teacher_couplings)
from jdistill.diffusion.schedules import alpha_sigma
from jdistill.models.denoiser import is_unguided, with_zero_embedding
from jdistill.models.unet import MAX_STEPS
from jdistill.objectives import state as state_lib
from jdistill.objectives.guided import draw_guidance
from jdistill.objectives.state import TrainState

VARIANTS = ("dmd2", "tdm", "tdm_fresh_noise")
REGRESSION_SOURCES = ("pairs", "data")


def draw_step_index(rng, steps):
  """k ~ U{0..K-1} per example: which step of its K-step generator an example trains."""
  return jnp.floor(jax.random.uniform(rng, steps.shape) * steps).astype(jnp.int32)


def diffuse_trajectory_state(x_hat, eps_hat, logsnr_s, logsnr_t, s, eps):
  """TDM: the student's trajectory state at s, z_s = alpha_s x_hat + sigma_s eps_hat (x_hat itself
  at s = 0, where the sampler returns x_hat), diffused forward to t >= s with fresh noise eps:

    z_t = (alpha_t / alpha_s) z_s + sigma_{t|s} eps,  sigma_{t|s}^2 = sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2,

  so z_t = alpha_t x_hat + sigma_t eps_mix with eps_mix = ((alpha_t / alpha_s) sigma_s eps_hat
  + sigma_{t|s} eps) / sigma_t. Returns (z_t, eps_mix); per-example (B,) logsnr_s, logsnr_t, s."""
  alpha_s, sigma_s = alpha_sigma(broadcast_to_data(logsnr_s, x_hat))
  at_end = broadcast_to_data(s, x_hat) == 0.0
  alpha_s, sigma_s = jnp.where(at_end, 1.0, alpha_s), jnp.where(at_end, 0.0, sigma_s)
  alpha_t, sigma_t = alpha_sigma(broadcast_to_data(logsnr_t, x_hat))
  alpha_ts = alpha_t / alpha_s
  sigma_ts = jnp.sqrt(jnp.maximum(jnp.square(sigma_t) - jnp.square(alpha_ts * sigma_s), 0.0))
  z_s = alpha_s * x_hat + sigma_s * eps_hat
  eps_mix = (alpha_ts * sigma_s * eps_hat + sigma_ts * eps) / sigma_t
  return alpha_ts * z_s + sigma_ts * eps, eps_mix


def trajectory_importance_weight(eps_mix, eps):
  """TDM's importance weight for the fake score's denoising loss. Its z_t = alpha_t x_hat +
  sigma_t eps_mix is drawn through the fresh eps ~ N(0, I), so eps_mix is not N(0, I) noise; the
  weight moves the loss towards the denoising target's N(0, I) by the density ratio, per dimension
  (the d-th root; d the data size) as in the official code, which also drops the constant factor:

    w = [N(eps_mix; 0, I) / N(eps; 0, I)]^(1/d) = exp(-(||eps_mix||^2 - ||eps||^2) / (2 d)).

  w = 1 at the last step (s = 0: eps_mix = eps). Per example, (B,)."""
  axes = tuple(range(1, eps.ndim))
  return jnp.exp(-0.5 * (jnp.mean(jnp.square(eps_mix), axis=axes) - jnp.mean(jnp.square(eps), axis=axes)))


@flax.struct.dataclass
class DistributionMatchingFrozen:
  teacher: Any                 # the real score's params
  regression: Any = None       # regression_source='pairs': {label, trajectory} (regression_pairs)


@flax.struct.dataclass
class DistributionMatchingState:
  step: jnp.ndarray            # train_step calls (critic updates)
  generator: TrainState
  critic: TrainState           # params {'score': denoiser params, 'gan_head': {'w', 'b'} or {}}


@dataclasses.dataclass(frozen=True)
class DistributionMatchingObjective(state_lib.Objective):
  denoiser: Any
  schedule: Any
  generator_optimizer: Any
  critic_optimizer: Any
  generator_optim: Any             # config.optim (the generator's lr schedule and EMA)
  critic_optim: Any                # config.optim with config.dmd.critic_lr
  data_shape: tuple
  num_steps: int                   # train_step calls in the run (for the lr schedules)
  variant: str = "dmd2"
  generator_steps: int = 1         # K
  critic_updates_per_generator: int = 5
  t_min: float = 0.02
  t_max: float = 0.98
  guidance: float = 0.0
  critic_weighting: str = "v_mse"
  min_snr_gamma: float = 5.0       # gamma of a 'min_snr' critic weighting
  regression_weight: float = 0.0   # DMD1 regression to the teacher's ODE (frozen['regression'])
  regression_steps: int = 32
  regression_source: str = "pairs"  # 'pairs': fixed, frozen['regression']; 'data': online from data
  gan_weight: float = 0.0
  huber_c: float = 0.03             # TDM's pseudo-Huber constant (the paper's: 1e-3)
  unify_steps: tuple = ()          # TDM-unify: K drawn per example from these, told to both nets
  step_intervals: bool = True      # TDM: diffuse step k's output only to t in [s_k, t_k]
  step_aware_critic: bool = True   # K > 1: the critic is told which step made each sample
  clip_x: bool = False             # rollouts clip x_hat to [-1, 1] like the sampler does
  lora: Any = None                 # a LoRA: generator and critic train adapters over the teacher
  guidance_range: tuple = ()       # (w_min, w_max): a guidance-conditioned generator and critic,
                                   # told w ~ U[w_min, w_max] per example; the real score is the
                                   # teacher's CFG at that w

  # ---------------------------------------------------------------- state
  def new_state(self, teacher_params, rng=None) -> DistributionMatchingState:
    rng = jax.random.key(0) if rng is None else rng
    gan_head = {}
    if self.gan_weight > 0:
      channels = self.bottleneck_channels(teacher_params)
      gan_head = {"w": 0.01 * jax.random.normal(rng, (channels, 1)), "b": jnp.zeros((1,))}
    told = lambda params, steps: with_zero_embedding(
        self.denoiser, params, jnp.zeros((1, *self.data_shape)), step_conditioned=steps,
        guided=bool(self.guidance_range))
    generator = told(teacher_params, bool(self.unify_steps))
    critic = told(teacher_params, self.critic_is_told())
    if self.lora is not None:       # both adapt the one frozen teacher (no step embedding: validated)
      generator = state_lib.trainable(self.lora, teacher_params, jax.random.fold_in(rng, 1))
      critic = state_lib.trainable(self.lora, teacher_params, jax.random.fold_in(rng, 2))
    return DistributionMatchingState(
        step=jnp.zeros((), jnp.int32),
        generator=state_lib.create(generator, self.generator_optimizer),
        critic=state_lib.create({"score": critic, "gan_head": gan_head},
                                self.critic_optimizer, ema=False))

  def init_state(self, rng):
    return self.new_state(self.denoiser.init(rng, jnp.zeros((1, *self.data_shape)))["params"], rng)

  def eval_params(self, state, frozen=None):
    return self.full(state.generator.ema_params, frozen)

  def full(self, trainable, frozen):
    """A network's params from what trains (the params, or LoRA adapters over the teacher)."""
    return state_lib.full_params(self.lora, trainable, None if frozen is None else frozen.teacher)

  def full_critic(self, critic_params, frozen):
    return dict(critic_params, score=self.full(critic_params["score"], frozen))

  def regression_grid(self):
    """M: the regression pairs keep the teacher's ODE state at t = m / M, M = lcm of the K in use."""
    return math.lcm(*self.step_counts())

  def regression_pairs(self, teacher_params, num_pairs, seed=0, batch_size=500):
    """DMD1's fixed pairs, computed once before training: {label, trajectory[, guidance]}, the
    teacher's `regression_steps`-step DDIM trajectory (guided if conditional; with a
    `guidance_range`, at a w drawn per pair) from stored noise, kept at t = m / M for m = M..0
    (trajectory[:, 0] the noise, trajectory[:, -1] the sample x)."""
    grid = self.regression_grid()
    guidance = self.guidance
    if self.guidance_range:
      guidance = draw_guidance(jax.random.fold_in(jax.random.key(seed), 2), num_pairs,
                               self.guidance_range)
    pairs = teacher_couplings(self.denoiser, self.schedule, teacher_params, self.data_shape,
                              num_pairs, seed, grid, -(-self.regression_steps // grid), guidance,
                              batch_size)
    return dict(pairs, guidance=guidance) if self.guidance_range else pairs

  def regression_loss(self, params, pairs, steps, rng):
    """Step k of K from the teacher's ODE state at t_k = (K - k) / K must land on its state at
    s_k = t_k - 1 / K (the sample x at s = 0). K = 1 is DMD1's regression G(noise) -> x; K > 1
    regresses every step onto its segment."""
    rng_pick, rng_k = jax.random.split(rng)
    pick = jax.random.randint(rng_pick, steps.shape, 0, pairs["trajectory"].shape[0])
    k = draw_step_index(rng_k, steps)
    stride = self.regression_grid() // steps                    # grid points per generator step
    z_t, z_s = pairs["trajectory"][pick, k * stride], pairs["trajectory"][pick, (k + 1) * stride]
    label = pairs["label"][pick] if self.denoiser.num_classes else None
    w = pairs["guidance"][pick] if self.guidance_range else None
    return self._regress_step(params, z_t, z_s, z_s, *self._segment(steps, k), label, steps, w)

  def data_regression_loss(self, params, teacher_params, x_data, label, steps, rng, w=None):
    """`regression_source='data'`, progressive-style: step k starts from data noised to t_k,
    z_t = alpha_t x + sigma_t eps (the teacher ODE's marginal at t_k), and the teacher runs its
    segment t_k -> s_k online in ceil(regression_steps / min K) DDIM substeps. Fresh states every
    step: no fixed trajectories to memorise (docs/results.md)."""
    rng_k, rng_eps = jax.random.split(rng)
    t, s = self._segment(steps, draw_step_index(rng_k, steps))
    z_t, _ = forward_process(x_data, t, jax.random.normal(rng_eps, x_data.shape), self.schedule)
    predict = lambda z, logsnr: self.denoiser.predict_guided(
        teacher_params, z, logsnr, label, self.guidance if w is None else w)
    substeps = -(-self.regression_steps // min(self.step_counts()))
    z_s, x_end = ddim_segment(predict, self.schedule, z_t, t, s, substeps)
    return self._regress_step(params, z_t, z_s, x_end, t, s, label, steps, w)

  @staticmethod
  def _segment(steps, k):
    """(t_k, s_k) = ((K - k) / K, (K - k - 1) / K): step k of a K-step generator."""
    k_total = steps.astype(jnp.float32)
    return (k_total - k) / k_total, (k_total - k - 1) / k_total

  def _regress_step(self, params, z_t, z_s, x_at_end, t, s, label, steps, w=None):
    """MSE of G(z_t) to x_target, the x of the one DDIM step z_t -> z_s (x_at_end at s = 0)."""
    x_target = ddim_x_target(z_t, z_s, x_at_end, self.schedule(t), self.schedule(s), s)
    return jnp.mean(per_example_mse(self.generate(params, z_t, t, label, steps, w),
                                    jax.lax.stop_gradient(x_target)))

  def bottleneck_channels(self, params):
    z = jnp.zeros((1, *self.data_shape))
    _, (features,) = jax.eval_shape(
        lambda p: self.denoiser.predict_with_features(p, z, jnp.zeros((1,))), params)
    return features.shape[-1]

  # ---------------------------------------------------------------- the networks
  def _predict(self, params, z, t, label, guidance=0.0, steps=None, told=None):
    """`steps` (K per example) reaches only step-conditioned params: never the teacher's.
    `guidance`: two-pass CFG at w (the teacher); `told`: the w a guidance-conditioned network is
    told (generator and critic with a `guidance_range`)."""
    logsnr = self.schedule(t)
    if not is_unguided(guidance):
      return self.denoiser.predict_guided(params, z, logsnr, label, guidance, steps)
    return self.denoiser.predict(params, z, logsnr, label, steps=steps, guidance=told)

  def draw_step_counts(self, rng, batch):
    """K per example: `generator_steps`, or uniform over `unify_steps` (TDM-unify)."""
    if not self.unify_steps:
      return jnp.full((batch,), self.generator_steps, jnp.int32)
    return jnp.asarray(self.unify_steps, jnp.int32)[
        jax.random.randint(rng, (batch,), 0, len(self.unify_steps))]

  def step_counts(self):
    return tuple(sorted(set(self.unify_steps or (self.generator_steps,))))

  def critic_is_told(self):
    return bool(self.unify_steps) or (self.step_aware_critic and max(self.step_counts()) > 1)

  def critic_step_ids(self, steps, t_k):
    """What the critic is told about a sample from step k of a K-step generator (None: nothing).
    Step-aware (K > 1): id = offset(K) + k + 1 over the step counts in use, so the critic models
    each step's output distribution p_k rather than their mixture. A mixture can match the data
    while its parts do not, and then every step's gradient vanishes with the last step's samples
    still wrong (toy2d, 4 steps: FD 0.08-0.2 with a mixture critic). Else K (TDM-unify) or None."""
    if not self.critic_is_told():
      return None
    if not self.step_aware_critic:
      return steps
    counts = self.step_counts()
    offsets = np.zeros(MAX_STEPS + 1, np.int32)
    offsets[list(counts)] = np.cumsum((0,) + counts[:-1])
    k = jnp.round(steps * (1.0 - t_k)).astype(jnp.int32)
    return jnp.asarray(offsets)[steps] + k + 1

  def rollout(self, params, noise, label, steps, rng, w=None):
    """(z_{t_k}, t_k) per example, k ~ U{0..K-1}, from k generator steps without gradient."""
    rng_k, rng_noise = jax.random.split(rng)
    k = draw_step_index(rng_k, steps)
    k_total = steps.astype(jnp.float32)
    params = jax.lax.stop_gradient(params)
    z, z_k = noise, noise
    for j in range(max(self.step_counts()) - 1):
      t_j = (k_total - j) / k_total
      pred = self._predict(params, z, t_j, label, steps=steps, told=w)
      if self.clip_x:             # the trajectory the sampler will take (sampling.sample)
        pred = clip_x0(pred, z, self.schedule(t_j))
      s_j = jnp.maximum(k_total - j - 1, 0.0) / k_total
      if self.variant == "dmd2":
        z = renoise_step(pred, self.schedule(s_j), jax.random.normal(jax.random.fold_in(rng_noise, j), z.shape))
      else:
        z = ddim_step(pred, self.schedule(s_j))
      z_k = jnp.where(broadcast_to_data(k == j + 1, z), z, z_k)
    return jax.lax.stop_gradient(z_k), (k_total - k) / k_total

  def generate(self, params, z_k, t_k, label, steps, w=None):
    return self._predict(params, z_k, t_k, label, steps=steps, told=w).x0

  def generate_step(self, params, z_k, t_k, label, steps, w=None):
    """The generator's step t_k -> s_k: its Prediction (x_hat, eps_hat)."""
    return self._predict(params, z_k, t_k, label, steps=steps, told=w)

  def gan_logit(self, critic_params, z_t, t, label):
    _, (features,) = self.denoiser.predict_with_features(critic_params["score"], z_t, self.schedule(t), label)
    pooled = jnp.mean(features, axis=tuple(range(1, features.ndim - 1)))
    return (pooled @ critic_params["gan_head"]["w"] + critic_params["gan_head"]["b"])[:, 0]

  def noise_interval(self, t_k, steps, low=0.0, high=1.0):
    """Where the output of the step from t_k to s_k = t_k - 1/K is diffused to. TDM
    (step_intervals): [s_k, t_k], the noise levels that step is responsible for, so the critic
    models each step's own output distribution (no mixture over steps); without step_intervals
    'tdm' still starts at s_k (its trajectory state at s_k only diffuses forward); DMD2: [low, high]."""
    if self.variant == "dmd2" or (self.variant == "tdm_fresh_noise" and not self.step_intervals):
      return low, high
    s_k = t_k - 1.0 / steps.astype(jnp.float32)
    return jnp.maximum(s_k, low), jnp.minimum(t_k, high) if self.step_intervals else high

  def _noise(self, x, rng, low, high):
    rng_t, rng_eps = jax.random.split(rng)
    t = jax.random.uniform(rng_t, (x.shape[0],), minval=low, maxval=high)
    z_t, logsnr = forward_process(x, t, jax.random.normal(rng_eps, x.shape), self.schedule)
    return z_t, t, logsnr

  def noise_generated(self, generated, t_k, steps, rng, low=0.0, high=1.0):
    """z_t from the generator's step t_k -> s_k (`generated`: its Prediction), t drawn in
    `noise_interval`: 'tdm' diffuses its trajectory state z_s forward (`diffuse_trajectory_state`),
    the others x_hat with fresh noise. Returns (z_t, t, logsnr_t, importance weight (B,) or 1)."""
    low, high = self.noise_interval(t_k, steps, low, high)
    if self.variant != "tdm":
      return (*self._noise(generated.x0, rng, low, high), 1.0)
    rng_t, rng_eps = jax.random.split(rng)
    x = generated.x0
    t = jax.random.uniform(rng_t, (x.shape[0],), minval=low, maxval=high)
    eps = jax.random.normal(rng_eps, x.shape)
    s = jnp.maximum(t_k - 1.0 / steps.astype(jnp.float32), 0.0)
    logsnr = self.schedule(t)
    z_t, eps_mix = diffuse_trajectory_state(x, generated.eps, self.schedule(s), logsnr, s, eps)
    return z_t, t, logsnr, trajectory_importance_weight(eps_mix, eps)

  # ---------------------------------------------------------------- losses
  def critic_loss(self, critic_params, generated, x_data, label, steps, t_k, rng, frozen=None,
                  w=None):
    """`generated`: sg of the generator's Prediction (x_hat, eps_hat) at the rolled-out step."""
    critic_params = self.full_critic(critic_params, frozen)
    x_generated = generated.x0
    rng_noise, rng_gan = jax.random.split(rng)
    z_t, t, logsnr, weight = self.noise_generated(generated, t_k, steps, rng_noise)
    pred = self._predict(critic_params["score"], z_t, t, label,
                         steps=self.critic_step_ids(steps, t_k), told=w)
    # DMD2: the teacher's weighting (v_mse); TDM: x0-MSE x min(SNR, gamma), 'tdm' x its importance weight
    loss = jnp.mean(weight * weighted_x_loss(pred.x0, x_generated, logsnr, self.critic_weighting,
                                              self.min_snr_gamma))
    metrics = {"critic_denoising_loss": loss}
    if self.gan_weight > 0:      # real and fake each at their own t and noise
      rng_fake, rng_real = jax.random.split(rng_gan)
      z_fake, t_fake, _ = self._noise(x_generated, rng_fake, self.t_min, self.t_max)
      z_real, t_real, _ = self._noise(x_data, rng_real, self.t_min, self.t_max)
      gan = jnp.mean(jax.nn.softplus(-self.gan_logit(critic_params, z_real, t_real, label)) +
                     jax.nn.softplus(self.gan_logit(critic_params, z_fake, t_fake, label)))
      loss = loss + self.gan_weight * gan
      metrics["critic_gan_loss"] = gan
    return loss, metrics

  def generator_loss(self, params, critic_params, teacher_params, z_k, t_k, label, steps, rng,
                     regression=None, x_data=None, frozen=None, w=None):
    params, critic_params = self.full(params, frozen), self.full_critic(critic_params, frozen)
    rng_noise, rng_gan, rng_pairs = jax.random.split(rng, 3)
    generated = self.generate_step(params, z_k, t_k, label, steps, w)
    x = generated.x0
    z_t, t, _, _ = self.noise_generated(jax.lax.stop_gradient(generated), t_k, steps, rng_noise,
                                        self.t_min, self.t_max)
    x_real = self._predict(teacher_params, z_t, t, label, self.guidance if w is None else w).x0
    x_fake = self._predict(critic_params["score"], z_t, t, label,
                           steps=self.critic_step_ids(steps, t_k), told=w).x0
    x_real, x_fake = jax.lax.stop_gradient(x_real), jax.lax.stop_gradient(x_fake)
    axes = tuple(range(1, x.ndim))
    if self.variant == "dmd2":
      p_real, p_fake = jax.lax.stop_gradient(x) - x_real, jax.lax.stop_gradient(x) - x_fake
      normaliser = jnp.mean(jnp.abs(p_real), axis=axes, keepdims=True) + 1e-8
      grad = jnp.nan_to_num((p_real - p_fake) / normaliser)
      loss = 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - grad)))
    else:
      target = jax.lax.stop_gradient(x + (x_real - x_fake))
      huber = jnp.sqrt(jnp.square(x - target) + self.huber_c**2) - self.huber_c
      normaliser = jax.lax.stop_gradient(jnp.mean(jnp.abs(x - x_real), axis=axes)) + 1e-8
      loss = jnp.mean(jnp.mean(huber, axis=axes) / normaliser)
    metrics = {"generator_dm_loss": loss,
               "score_difference": jnp.mean(jnp.sqrt(per_example_mse(x_real, x_fake)))}
    if self.regression_weight > 0:      # the teacher's ODE: DMD1 (K = 1), each step (K > 1)
      if self.regression_source == "data":
        regression_loss = self.data_regression_loss(params, teacher_params, x_data, label, steps,
                                                    rng_pairs, w)
      elif regression is None:
        raise ValueError("config.dmd.regression_weight > 0 needs frozen.regression = "
                         "objective.regression_pairs(teacher_params, n) (the driver computes it)")
      else:
        regression_loss = self.regression_loss(params, regression, steps, rng_pairs)
      loss = loss + self.regression_weight * regression_loss
      metrics["regression_loss"] = regression_loss
    if self.gan_weight > 0:
      z_gan, t_gan, _ = self._noise(x, rng_gan, self.t_min, self.t_max)
      gan = jnp.mean(jax.nn.softplus(-self.gan_logit(jax.lax.stop_gradient(critic_params), z_gan, t_gan, label)))
      loss = loss + self.gan_weight * gan
      metrics["generator_gan_loss"] = gan
    return loss, metrics

  # ---------------------------------------------------------------- the step
  def phase_of(self, step: int):
    """Whether loop step `step` updates the generator, as a static program choice (the loop
    compiles a critic-only and a critic + generator step): with a lax.cond around the generator
    update, digits DMD2 at 5:1 ran 5.2x slower on XLA:CPU (backward convolutions inside a
    conditional branch are left un-canonicalised; benchmarks/README.md). None at 1:1."""
    if self.critic_updates_per_generator == 1:
      return None
    return (step + 1) % self.critic_updates_per_generator == 0

  def train_step(self, state, batch, rng, frozen, stage, phase=None):
    """One critic update, and a generator update every `critic_updates_per_generator` calls:
    decided by `phase` (static, from `phase_of`) or, when None, by state.step inside a lax.cond."""
    del stage
    teacher = frozen.teacher
    label = batch["label"] if self.denoiser.num_classes else None
    rng_noise, rng_steps, rng_roll, rng_critic, rng_gen = jax.random.split(rng, 5)
    noise = jax.random.normal(rng_noise, batch["x"].shape)
    steps = self.draw_step_counts(rng_steps, noise.shape[0])
    w = (draw_guidance(jax.random.fold_in(rng, 11), noise.shape[0], self.guidance_range)
         if self.guidance_range else None)

    # the critic: denoise the generator's current samples
    generator_params = self.full(state.generator.params, frozen)
    z_k, t_k = self.rollout(generator_params, noise, label, steps, rng_roll, w)
    generated = jax.lax.stop_gradient(self.generate_step(generator_params, z_k, t_k, label, steps, w))
    (critic_loss, critic_metrics), critic_grads = jax.value_and_grad(self.critic_loss, has_aux=True)(
        state.critic.params, generated, batch["x"], label, steps, t_k, rng_critic, frozen, w)
    critic, critic_update = state_lib.optimizer_update(    # lr by train_step calls
        state.critic, critic_grads, self.critic_optimizer, self.critic_optim, self.num_steps,
        step=state.step)

    # the generator: every `critic_updates_per_generator` steps, against the updated critic
    def generator_update(_):
      (loss, metrics), grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
          state.generator.params, critic.params, teacher, z_k, t_k, label, steps, rng_gen,
          frozen.regression, batch["x"], frozen, w)
      generator, update = state_lib.optimizer_update(
          state.generator, grads, self.generator_optimizer, self.generator_optim,
          self.num_steps // self.critic_updates_per_generator)
      return generator, dict(metrics, generator_loss=loss, generator_grad_norm=update["grad_norm"])

    def skip(_):
      shapes = jax.eval_shape(generator_update, None)[1]
      return state.generator, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    if self.critic_updates_per_generator == 1 or phase is not None:
      update = self.critic_updates_per_generator == 1 or bool(phase)
      generator, generator_metrics = (generator_update if update else skip)(None)
      update_now = jnp.asarray(update)
    else:
      update_now = (state.step + 1) % self.critic_updates_per_generator == 0
      generator, generator_metrics = jax.lax.cond(update_now, generator_update, skip, None)

    new_state = DistributionMatchingState(step=state.step + 1, generator=generator, critic=critic)
    total = critic_loss + generator_metrics["generator_loss"]
    metrics = dict(critic_metrics, **generator_metrics, critic_loss=critic_loss,
                   critic_grad_norm=critic_update["grad_norm"],
                   generator_updated=update_now.astype(jnp.float32))
    new_state, guard = state_lib.keep_if_finite(
        new_state, state, total, (critic_update["grad_norm"], generator_metrics["generator_grad_norm"],
                                  generator.params, critic.params))
    metrics.update(guard)
    return new_state, metrics
