"""The ground floor's directory lock: one writer per run directory (or cache directory), since
writers share fixed tmp names. The lock file records its holder (pid, host, start time, command).
A holder that died on this host leaves a stale lock, taken over with a warning; a lock from
another host is refused (it cannot be checked from here). Only process 0 locks."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time

import jax
from absl import logging

NAME = "jdistill.lock"


class LockError(RuntimeError):
  """Another run holds the directory (names the holder and the lock file)."""


@contextlib.contextmanager
def hold(directory: str, what: str = "workdir"):
  """Holds `directory`'s lock while the block runs, released however it ends (process 0 only;
  a gs:// directory is not locked)."""
  path = None
  if jax.process_index() == 0:
    if "://" in directory:
      logging.warning("%s %s is not on local disk, so it is not locked: run one writer at a time",
                      what, directory)
    else:
      path = acquire(directory, what)
  try:
    yield
  finally:
    if path:
      release(path)


def acquire(directory: str, what: str = "workdir") -> str:
  """Creates `directory`/jdistill.lock (atomically: O_CREAT | O_EXCL) naming this process, taking
  over a stale one; returns its path. Raises LockError if a live or foreign run holds it."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, NAME)
  holder = dict(pid=os.getpid(), host=socket.gethostname(),
                started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command=" ".join(sys.argv))
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      _take_over_if_stale(path, directory, what)
      continue
    with os.fdopen(fd, "w") as f:
      json.dump(holder, f)
    return path


def release(path: str):
  """Removes the lock at `path` if this process holds it."""
  holder = _holder(_read(path))
  if holder and (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname()):
    os.remove(path)


def _take_over_if_stale(path, directory, what):
  text = _read(path)
  if text is None:                     # released meanwhile: try again
    return
  holder = _holder(text)
  remove = f"if you are sure no run uses {directory}, delete {path}"
  if holder is None:
    raise LockError(f"{what} {directory} is locked by {path}, which names no holder: {remove}")
  described = (f"pid {holder['pid']} on {holder['host']}, started {holder.get('started')}: "
               f"{holder.get('command')}")
  if holder["host"] != socket.gethostname():
    raise LockError(f"{what} {directory} is in use by {described}. That host cannot be checked "
                    f"from {socket.gethostname()}: {remove}")
  if _alive(holder["pid"]):
    raise LockError(f"{what} {directory} is in use by {described}. Two runs in one directory "
                    f"overwrite each other's files: wait for it, stop it, or use another "
                    f"directory ({remove})")
  logging.warning("Taking over the stale lock %s: its holder, %s, is no longer running", path,
                  described)
  claimed = f"{path}.{os.getpid()}"
  try:
    os.rename(path, claimed)           # of several runs taking over, one renames the stale lock
  except FileNotFoundError:
    return
  if _read(claimed) == text:
    os.remove(claimed)
  else:                                # a new holder's lock went in between: give it back
    os.rename(claimed, path)


def _read(path):
  try:
    with open(path) as f:
      return f.read()
  except FileNotFoundError:
    return None


def _holder(text):
  """The holder recorded in a lock file's text, or None if it names none."""
  try:
    holder = json.loads(text or "")
  except ValueError:
    return None
  named = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and "host" in holder
  return holder if named else None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:              # another user's process
    return True
  return True
