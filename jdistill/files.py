"""The ground floor: atomic file writes (process 0 only; local disk or gs://), content digests and
the time format of progress logs. Every layer may import this; it imports no other jdistill module."""
from __future__ import annotations

import hashlib
import json

import jax
from etils import epath


def write_bytes(path: str, data: bytes):
  """Atomic write (tmp + rename) on local disk or gs://, process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = epath.Path(str(path) + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(epath.Path(path))


def write_text(path: str, text: str):
  write_bytes(path, text.encode())


def write_json(path: str, payload: dict):
  """Atomic JSON write, process 0 only."""
  write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: str):
  """The JSON at `path` (local or gs://), or None if there is none."""
  path = epath.Path(path)
  return json.loads(path.read_text()) if path.exists() else None


def sha256(path: str) -> str:
  """SHA-256 (hex) of a file's bytes, or of a directory tree's relative file paths and bytes."""
  root, digest = epath.Path(path), hashlib.sha256()
  if not root.is_dir():
    with root.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()
  for file in sorted(p for p in root.rglob("*") if p.is_file()):
    digest.update(f"{file.relative_to(root)}\0{sha256(str(file))}\0".encode())
  return digest.hexdigest()


def hms(seconds) -> str:
  """12345 -> '3h25m45s'."""
  seconds = int(seconds)
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
