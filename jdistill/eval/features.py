"""Feature networks for Frechet distance.

- `digits`: a small CNN classifier of 8x8 digits that jdistill trains itself; its weights ship in
  jdistill/assets/digits_classifier.msgpack and are reproduced by
  `python -m jdistill.eval.features --out=jdistill/assets/digits_classifier.msgpack`.
  Features are its 64-d penultimate activations.
- `raw`: the data itself (toy 2-D points).
- `inception`: InceptionV3 pool3 features from a user-supplied weights file (jdistill/eval/inception.py).
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
DIGITS_CLASSIFIER = os.path.join(ASSETS, "digits_classifier.msgpack")


class DigitsClassifier(nn.Module):
  @nn.compact
  def __call__(self, x, return_features=False):
    h = nn.relu(nn.Conv(32, (3, 3))(x))
    h = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(h))
    h = nn.relu(nn.Conv(64, (3, 3))(h))
    h = nn.relu(nn.Dense(128)(h.reshape(h.shape[0], -1)))
    features = nn.relu(nn.Dense(64)(h))
    if return_features:
      return features
    return nn.Dense(10)(features)


def _shift_augment(rng, x):
  """Random shifts of up to 1 pixel (padding with the background value -1)."""
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(rng, (x.shape[0], 2), 0, 3)
  return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (8, 8, 1)))(padded, offsets)


def train_digits_classifier(steps: int = 3000, batch_size: int = 128, seed: int = 0):
  """Trains the digits feature net on the train split; returns (params, held-out accuracy)."""
  from jdistill.data import sources
  train, test = sources.digits("train").records, sources.digits("test").records
  model = DigitsClassifier()
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
  optimizer = optax.adamw(optax.cosine_decay_schedule(1e-3, steps), weight_decay=1e-4)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, y, rng):
    x = _shift_augment(rng, x)
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.RandomState(seed)
  for i in range(steps):
    index = rng.randint(0, len(train), batch_size)
    params, opt_state = step(params, opt_state, train.x[index], train.label[index],
                             jax.random.key(i))
  logits = model.apply({"params": params}, test.x)
  accuracy = float(np.mean(np.argmax(logits, -1) == test.label))
  return params, accuracy


@functools.lru_cache(maxsize=None)
def load_digits_classifier(path: str = DIGITS_CLASSIFIER, logits: bool = False):
  """images -> the classifier's 64 features (FD's space), or its 10 class logits."""
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"digits feature net weights not found at {path}; rebuild them with "
        "`python -m jdistill.eval.features --out=jdistill/assets/digits_classifier.msgpack`")
  template = DigitsClassifier().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  with open(path, "rb") as f:
    params = serialization.from_bytes(template, f.read())
  apply = jax.jit(lambda p, x: DigitsClassifier().apply({"params": p}, x,
                                                          return_features=not logits))
  return lambda images: np.asarray(apply(params, jnp.asarray(images, jnp.float32)))


def classifier_fn(name: str):
  """images -> predicted classes by the feature net, where it is a classifier ('digits'; for the
  class accuracy of conditional samples), else None."""
  if name != "digits":
    return None
  logits = load_digits_classifier(logits=True)
  return lambda images: np.argmax(logits(images), axis=-1)


def feature_fn(name: str, inception_weights: str = ""):
  """A function mapping data in [-1, 1] (NHWC images or (N, 2) points) to feature vectors."""
  if name == "digits":
    return load_digits_classifier()
  if name == "raw":
    return lambda x: np.asarray(x).reshape(len(x), -1)
  if name == "inception":
    from jdistill.eval import inception
    return inception.feature_fn(inception_weights)
  raise ValueError(f"config.eval.features: unknown feature net {name!r}; use digits, raw or inception")


def main():
  import argparse
  parser = argparse.ArgumentParser(description="Train the digits feature net used for FD.")
  parser.add_argument("--out", default=DIGITS_CLASSIFIER)
  parser.add_argument("--steps", type=int, default=3000)
  args = parser.parse_args()
  params, accuracy = train_digits_classifier(args.steps)
  with open(args.out, "wb") as f:
    f.write(serialization.to_bytes(params))
  print(f"held-out accuracy {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
  main()
