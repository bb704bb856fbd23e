"""The DiT: shapes and size, identity blocks at init, parity with diffusers' DiTTransformer2DModel
through the state-dict converter, its errors, config checks, and short distillation runs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdistill.config import base_config, validate
from jdistill.errors import ConfigError
from jdistill.models.denoiser import make_denoiser
from jdistill.models.dit import DiT, position_embedding
from jdistill.models.dit_diffusers import dit_from_diffusers_config, dit_params_from_diffusers
from jdistill.models.unet import logsnr_time

TINY = dict(out_channels=2, hidden=32, patch_size=2, depth=3, num_heads=2, num_classes=10)


def _count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))


def test_fresh_dit_shapes_size_and_identity_blocks():
  module = DiT(**TINY)
  z = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  logsnr, label = jnp.linspace(-5.0, 5.0, 4), jnp.array([0, 3, 9, 10])
  params = nn.unbox(module.init(jax.random.key(1), z, logsnr, label))["params"]
  d, blocks = 32, 3
  per_block = 6 * d * d + 6 * d + 4 * (d * d + d) + 2 * 4 * d * d + 4 * d + d
  embed = (1 * 4 * d + d) + (256 * d + d + d * d + d) + 11 * d + (2 * d * d + 2 * d) + (4 * d * 2 + 8)
  assert _count(params) == blocks * per_block + embed == 68904
  out, state = module.apply({"params": params}, z, logsnr, label, capture_features=True,
                            mutable=["intermediates"])
  assert out.shape == (4, 8, 8, 2) and out.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(out))) == 0.0                  # zero-init final layer
  features = {name: value[0] for name, value in state["intermediates"].items()}
  assert sorted(features) == ["block_0", "block_1", "block_2", "bottleneck"]
  patches = z.reshape(4, 4, 2, 4, 2, 1).transpose(0, 1, 3, 2, 4, 5).reshape(4, 16, 4)
  embedded = (patches @ params["pos_embed"]["kernel"].reshape(4, d) + params["pos_embed"]["bias"]
              + position_embedding(d, 4, 4))
  for name in ("block_0", "block_2", "bottleneck"):            # zero gates: every block is the identity
    assert features[name].shape == (4, 16, d)
    np.testing.assert_allclose(features[name], embedded, atol=1e-5)
  gated = jax.tree.map(lambda x: x, params)
  gated["transformer_blocks_1"]["norm1_linear"]["bias"] = jnp.ones(6 * d)
  _, state = module.apply({"params": gated}, z, logsnr, label, capture_features=True,
                          mutable=["intermediates"])
  np.testing.assert_allclose(state["intermediates"]["block_0"][0], embedded, atol=1e-5)
  assert float(jnp.max(jnp.abs(state["intermediates"]["bottleneck"][0] - embedded))) > 0.1
  # time_is_logsnr: the U-Net's 1000 t' of logSNR, embedded like a diffusers timestep
  given = DiT(**TINY, time_is_logsnr=False)
  np.testing.assert_array_equal(module.apply({"params": gated}, z, logsnr, label),
                                given.apply({"params": gated}, z, logsnr_time(logsnr), label))


def test_position_embedding_is_diffusers():
  import torch  # noqa: F401 - diffusers' embedding is torch
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  for dim, grid in ((32, 4), (64, 6)):
    expected = get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt").numpy()
    np.testing.assert_allclose(position_embedding(dim, grid, grid), expected, atol=1e-6)


def _diffusers_dit():
  """A tiny random DiTTransformer2DModel whose blocks share one time and label embedder, as DiT
  checkpoints do, and its state dict as numpy arrays."""
  import torch
  from diffusers import DiTTransformer2DModel
  torch.manual_seed(0)
  model = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                attention_head_dim=8, num_attention_heads=2,
                                num_embeds_ada_norm=10).eval()
  with torch.no_grad():
    model.transformer_blocks[1].norm1.emb.load_state_dict(
        model.transformer_blocks[0].norm1.emb.state_dict())
  return model, {key: value.numpy() for key, value in model.state_dict().items()}


def test_converted_diffusers_dit_matches_pytorch():
  import torch
  model, state_dict = _diffusers_dit()
  module = dit_from_diffusers_config(model.config)
  params = dit_params_from_diffusers(state_dict, model.config)
  example = (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  fresh = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *example))["params"]
  assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, fresh)
  apply = jax.jit(lambda p, z, t, label: module.apply({"params": p}, z, t, label))
  x = np.random.RandomState(0).randn(16, 4, 8, 8).astype(np.float32)
  labels = np.arange(16) % 11                                  # 10: the null class
  worst = 0.0
  for t in (0.0, 1.0, 250.0, 617.5, 999.0):
    timesteps = np.full((16,), t, np.float32)
    with torch.no_grad():
      expected = model(torch.from_numpy(x), torch.from_numpy(timesteps),
                       torch.from_numpy(labels)).sample.numpy()
    ours = np.asarray(apply(params, x.transpose(0, 2, 3, 1), timesteps, labels)).transpose(0, 3, 1, 2)
    assert np.abs(expected).max() > 0.5
    worst = max(worst, float(np.abs(ours - expected).max()))
  print(f"diffusers DiT parity: max abs {worst:.3g}")
  assert worst <= 1e-4


@pytest.mark.parametrize("damage, named", [
    ("rename", "unexpected key 'transformer_blocks.1.attn1.to_qq.weight'"),
    ("rename", "missing key 'transformer_blocks.1.attn1.to_q.weight'"),
    ("drop", "missing key 'proj_out_2.bias'"),
    ("reshape", "key 'transformer_blocks.0.ff.net.2.weight' has shape (16, 63), expected (16, 64)"),
    ("embedder", "key 'transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight' "
                 "differs from 'transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight'"),
])
def test_bad_state_dict_key_is_named(damage, named):
  model, state_dict = _diffusers_dit()
  if damage == "rename":
    state_dict["transformer_blocks.1.attn1.to_qq.weight"] = state_dict.pop(
        "transformer_blocks.1.attn1.to_q.weight")
  elif damage == "drop":
    del state_dict["proj_out_2.bias"]
  elif damage == "reshape":
    state_dict["transformer_blocks.0.ff.net.2.weight"] = state_dict[
        "transformer_blocks.0.ff.net.2.weight"][:, :63]
  else:
    state_dict["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] = state_dict[
        "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"] + 1.0
  with pytest.raises(ValueError) as error:
    dit_params_from_diffusers(state_dict, model.config)
  assert named in str(error.value)


def test_unsupported_diffusers_config_is_named():
  _, state_dict = _diffusers_dit()
  with pytest.raises(ValueError, match="activation_fn='geglu' is not supported"):
    dit_params_from_diffusers(state_dict, dict(num_layers=2, activation_fn="geglu"))


def test_digits_dit_preset_and_config_checks():
  config = base_config("digits_dit")
  denoiser = make_denoiser(config.model, (8, 8, 1), "v")
  params = jax.eval_shape(denoiser.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  assert config.model.name == "dit" and _count(params) == 2_161_412   # the U-Net teacher: 2,247,553
  assert base_config("digits_dit_flow").diffusion.schedule.name == "flow"
  config.model.dtype = "bfloat16"         # bfloat16 compute, float32 params and output
  module = make_denoiser(config.model, (8, 8, 1), "v").module
  params = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)))
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype("float32")}
  out, features = jax.eval_shape(lambda p: module.apply(p, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)),
                                                        capture_features=True, mutable=["intermediates"]),
                                 nn.unbox(params))
  assert out.dtype == jnp.float32 and features["intermediates"]["bottleneck"][0].dtype == jnp.bfloat16
  assert base_config("digits").model.name == "unet"
  with pytest.raises(ConfigError, match="toy2d_dit"):
    base_config("toy2d_dit")
  for update, message in [
      (dict(num_heads=3), r"config.model.num_heads: 3 heads do not split .* 128"),
      (dict(channels=130), r"config.model.num_heads: 4 heads do not split .* 130"),
      (dict(channels=34, num_heads=2), r"config.model.channels: .* multiple of 4 .* got 34"),
      (dict(depth=0), r"config.model.depth: must be >= 1")]:
    bad = base_config("digits_dit")
    bad.model.update(update)
    with pytest.raises(ConfigError, match=message):
      validate(bad, 1)
  bad = base_config("digits_dit")
  bad.model.patch_size = 3
  with pytest.raises(ConfigError, match="config.model.patch_size: 3 does not divide the image side 8"):
    make_denoiser(bad.model, (8, 8, 1), "v")
  bad = base_config("cifar10_dit")
  bad.model.patch_size = 5
  with pytest.raises(ConfigError, match="config.model.patch_size: 5 does not divide the image side 32"):
    validate(bad, 1)


def test_step_embedding_starts_at_zero():
  module = DiT(**TINY)
  z, logsnr, label = jnp.ones((2, 8, 8, 1)), jnp.array([-1.0, 2.0]), jnp.array([1, 10])
  params = jax.eval_shape(module.init, jax.random.key(1), z, logsnr, label, steps=jnp.ones(2, jnp.int32))
  params = nn.unbox(params)["params"]
  assert params["step_embedding"]["embedding"].shape == (17, 32)
  params = jax.tree.map(lambda p: 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
  told = jax.jit(lambda p: module.apply({"params": p}, z, logsnr, label, steps=jnp.array([1, 4])))
  untold = jax.jit(lambda p: module.apply({"params": {k: v for k, v in p.items()
                                                      if k != "step_embedding"}}, z, logsnr, label))
  params["step_embedding"]["embedding"] = jnp.zeros((17, 32))
  np.testing.assert_allclose(told(params), untold(params), atol=1e-6)
  params["step_embedding"]["embedding"] = params["step_embedding"]["embedding"].at[4].set(1.0)
  difference = jnp.abs(told(params) - untold(params))
  assert float(jnp.max(difference[0])) == 0.0 and float(jnp.max(difference[1])) > 1e-3


def _tiny_dit(config):
  config.model.update(channels=16, num_heads=2, depth=2)
  return config


def _noised(params, seed, scale=0.05):
  return jax.tree.map(lambda p: p + scale * jax.random.normal(jax.random.key(seed), p.shape), params)


def test_progressive_stage_trains_a_dit_with_feature_distillation(tmp_path):
  import configs.progressive as progressive_config
  from jdistill.methods import progressive
  from jdistill.objectives import progressive as progressive_math
  from jdistill.train import loop, setup
  config = _tiny_dit(progressive_config.get_config("digits_dit"))
  config.features.update(layers=("block_0", "bottleneck"), weight_start=1.0, weight_end=0.0)
  exp = setup.build(config, str(tmp_path), evaluator=False)
  objective = progressive.make_objective(exp)
  compiled = loop.compile_step(objective, exp.mesh)
  teacher = _noised(loop.init_state(objective, compiled, jax.random.key(0)).params, 1)
  state = jax.jit(objective.new_state)(_noised(teacher, 2, 0.02))
  stage = progressive_math.make_stage(progressive_math.nested_grids([4, 2]), 0, 10)
  batch = {"x": np.asarray(exp.train_source.records.x[:16]), "label": np.zeros(16, np.int32)}
  losses, feature_losses = [], []
  for _ in range(6):
    state, metrics = compiled.fn(state, batch, jax.random.key(0),
                                 progressive_math.ProgressiveFrozen(teacher=teacher), stage)
    losses.append(float(metrics["distill_loss"]))
    feature_losses.append(float(metrics["feature_loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  assert 0 < feature_losses[-1] < feature_losses[0], feature_losses


def test_dmd2_trains_a_dit_with_the_gan_head_on_its_bottleneck(tmp_path):
  from jdistill.methods import distribution_matching as dm_method
  from jdistill.objectives import distribution_matching as dm
  from jdistill.train import loop, setup
  config = _tiny_dit(dm_method.get_config("digits_dit", "dmd2"))
  config.data.batch_size = 16
  config.dmd.update(critic_updates_per_generator=1, regression_weight=0.0, gan_weight=0.01)
  exp = setup.build(config, str(tmp_path), evaluator=False)
  objective = dm_method.make_objective(exp, 100)
  init = jax.jit(lambda rng: nn.unbox(exp.denoiser.init(rng, jnp.zeros((1, 8, 8, 1)))["params"]))
  teacher = _noised(init(jax.random.key(0)), 1)
  state = jax.jit(objective.new_state)(teacher)
  assert state.critic.params["gan_head"]["w"].shape == (16, 1)     # the DiT's hidden size
  before = jax.device_get(state.generator.params)
  batch = {"x": np.asarray(exp.train_source.records.x[:16]), "label": np.zeros(16, np.int32)}
  compiled = loop.compile_step(objective, exp.mesh)
  for i in range(2):
    state, metrics = compiled.fn(
        state, batch, jax.random.key(i), dm.DistributionMatchingFrozen(teacher=teacher), None)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["generator_updated"]) == 1.0 and float(metrics["critic_loss"]) > 0
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(jax.device_get(state.generator.params)), jax.tree.leaves(before))]
  assert max(moved) > 0
