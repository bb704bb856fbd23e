"""The one-writer lock of a run directory: a live holder is named and refused, a dead one on this
host is taken over, one on another host is refused with how to remove it; released however the run
ends; only process 0 locks; the command lines take it before writing anything."""
import json
import logging
import os
import re
import socket
import subprocess
import sys

import jax
import pytest

from jdistill import lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _write_lock(directory, **holder):
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, lock.NAME)
  with open(path, "w") as f:
    f.write(json.dumps(holder) if holder else "")
  return path


def _holder(path):
  with open(path) as f:
    return json.load(f)


def _dead_pid():
  process = subprocess.Popen(["true"])
  process.wait()
  return process.pid


def test_a_held_lock_refuses_a_second_writer_naming_the_holder(tmp_path):
  directory = str(tmp_path / "run")
  path = lock.acquire(directory)
  holder = _holder(path)
  assert (holder["pid"], holder["host"], holder["command"]) == (os.getpid(), socket.gethostname(),
                                                                " ".join(sys.argv))
  message = (f"workdir {directory} is in use by pid {os.getpid()} on {socket.gethostname()}, "
             f"started {holder['started']}: {holder['command']}. Two runs in one directory")
  with pytest.raises(lock.LockError, match=re.escape(message)):
    lock.acquire(directory)
  with pytest.raises(lock.LockError, match=re.escape(message)):
    with lock.hold(directory):
      pass
  assert _holder(path) == holder                  # the refused writer left the lock alone
  lock.release(path)
  assert not os.path.exists(path)
  lock.release(lock.acquire(directory))


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, caplog):
  directory = str(tmp_path / "run")
  dead = _dead_pid()
  path = _write_lock(directory, pid=dead, host=socket.gethostname(), started="then", command="killed")
  with caplog.at_level(logging.WARNING):
    assert lock.acquire(directory) == path
  assert _holder(path)["pid"] == os.getpid()
  assert f"pid {dead} on {socket.gethostname()}, started then: killed, is no longer running" in caplog.text
  assert os.listdir(directory) == [lock.NAME]     # no claimed copy left behind


def test_a_lock_from_another_host_or_without_a_holder_is_refused(tmp_path):
  directory = str(tmp_path / "run")
  path = _write_lock(directory, pid=_dead_pid(), host="elsewhere", started="then", command="train")
  with pytest.raises(lock.LockError, match=re.escape(
      f"is in use by pid {_holder(path)['pid']} on elsewhere, started then: train. That host cannot "
      f"be checked from {socket.gethostname()}: if you are sure no run uses {directory}, delete {path}")):
    lock.acquire(directory)
  _write_lock(directory)
  with pytest.raises(lock.LockError, match=re.escape(f"locked by {path}, which names no holder: if you "
                                                     f"are sure no run uses {directory}, delete {path}")):
    lock.acquire(directory)


def test_released_on_a_normal_exit_and_on_an_exception(tmp_path):
  directory = str(tmp_path / "run")
  path = os.path.join(directory, lock.NAME)
  with lock.hold(directory):
    assert _holder(path)["pid"] == os.getpid()
  assert not os.path.exists(path)
  with pytest.raises(ZeroDivisionError):
    with lock.hold(directory):
      1 / 0
  assert not os.path.exists(path)


def test_only_process_zero_locks(tmp_path, monkeypatch):
  directory = str(tmp_path / "run")
  path = lock.acquire(directory)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with lock.hold(directory):                      # shares process 0's directory
    pass
  assert _holder(path)["pid"] == os.getpid()


@pytest.mark.parametrize("command", [
    ["jdistill.main", "--config=configs/teacher.py"],
    ["jdistill.cache", "build-teacher", "--config=configs/multi_teacher.py", "--teacher=base"]],
    ids=["main", "cache"])
def test_a_second_command_line_run_stops_before_writing(tmp_path, command):
  workdir = tmp_path / "run"
  directory = workdir / "cache" / "teachers" / "base" if "jdistill.cache" in command else workdir
  held = lock.acquire(str(directory))
  result = subprocess.run([sys.executable, "-m", *command, f"--workdir={workdir}"], env=ENV,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  what = "workdir" if directory == workdir else "cache of teacher 'base'"
  assert f"LockError: {what} {directory} is in use by pid {os.getpid()} on " in result.stderr
  assert [p for p in tmp_path.rglob("*") if p.is_file()] == [directory / lock.NAME]   # nothing written
  lock.release(held)
