"""One writer per workdir: an exclusive lock that a second train/sweep on the same folder cannot take.

  with WorkdirLock(workdir):
    ...  # train or sweep; a second process fails at once with WorkdirLockedError

The lock is `fcntl.flock` on `<workdir>/.lock`: the OS releases it when its process dies (kill -9
included), so a crashed run never leaves a stale lock. The file says who holds it (pid, host,
command line) for the error a second holder gets. In a multi-process JAX job only process 0 takes
it; the job's other processes share its workdir. (flock is local to one machine: on network file
systems that do not forward it, two hosts are not kept apart.)
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys

import jax

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
  """Another process writes to this workdir."""


class WorkdirLock:
  """Context manager holding the exclusive lock on `<path>/.lock` (a no-op on JAX processes other than 0)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.file = self.path / LOCK_FILE
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    if jax.process_index() != 0:
      return self
    self.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 1 << 16, 0).decode(errors="replace")
      os.close(fd)
      raise WorkdirLockedError(f"{self.path} is in use by {_describe(holder)} (lock file {self.file}); wait "
                               "for it to finish or use another --workdir.") from None
    # Ours now: write who holds it (the file is only truncated once the lock is held).
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _describe(holder: str) -> str:
  try:
    info = json.loads(holder)
    return f"process {info['pid']} on {info['host']} running `{info['command']}`"
  except (json.JSONDecodeError, KeyError, TypeError):
    return "another process (it has not written its pid yet)"
