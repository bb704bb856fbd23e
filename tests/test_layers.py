"""The package's shape: every module imports on its own, and no module imports a higher layer.

Layers, lowest first (docs/architecture.md): the ground floor; diffusion, models, data,
curriculum; objectives, eval, config; train; methods; the command lines. A module may import its
own layer or lower ones, so there are no cycles between layers either.
"""
import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jdistill")
LAYERS = [
    ("files", "errors", "partitioning", "lock", "resume"),
    ("diffusion", "models", "data", "curriculum"),
    ("objectives", "eval", "config"),
    ("train",),
    ("methods",),
    ("main", "sample", "cache", "convert", "export"),
]


def layer_of(module: str) -> int:
  top = module.split(".")[1]
  for level, names in enumerate(LAYERS):
    if top in names:
      return level
  raise AssertionError(f"{module}: not in any layer; add it to LAYERS and docs/architecture.md")


def modules():
  for root, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports_of(path: str):
  """Every jdistill module `path` imports, at any depth (function-local imports count too)."""
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names if a.name.startswith("jdistill."))
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jdistill"):
      if node.module == "jdistill":
        yield from (f"jdistill.{a.name}" for a in node.names)
      else:
        yield node.module


def test_no_module_imports_a_higher_layer():
  upward = []
  for module, path in modules():
    if module == "jdistill":
      continue
    for imported in imports_of(path):
      if layer_of(imported) > layer_of(module):
        upward.append(f"{module} imports {imported}")
  assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles():
  graph = {m: {i for i in imports_of(p) if i != m} for m, p in modules()}
  known = set(graph)
  state = {}

  def visit(node, trail):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      nxt = nxt if nxt in known else nxt.rsplit(".", 1)[0]      # `from pkg import name`
      if nxt not in known:
        continue
      if state.get(nxt) == "open":
        raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
      if nxt not in state:
        visit(nxt, trail + [node])
    state[node] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [])


ISOLATED_IMPORTS = """
import importlib, os, sys
import absl, clu.metric_writers, flax, grain, jax, ml_collections, numpy, optax, orbax.checkpoint
failures = []
for module in sys.argv[1:]:
  pid = os.fork()
  if pid == 0:                    # a child with no jdistill module loaded yet
    try:
      importlib.import_module(module)
    except BaseException as e:
      print(f"{module}: {type(e).__name__}: {e}", flush=True)
      os._exit(1)
    os._exit(0)
  if os.waitpid(pid, 0)[1] != 0:
    failures.append(module)
sys.exit(1 if failures else 0)
"""


def test_every_module_imports_in_isolation():
  """Each module on its own in a fresh child process (third-party packages preloaded, no
  jdistill module): none relies on another having been imported first."""
  names = sorted(m for m, _ in modules())
  result = subprocess.run([sys.executable, "-c", ISOLATED_IMPORTS, *names], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
