"""A training job's workdir: the checks before it is used, its lock, and `--fresh`.

- `check(workdir, cfg, fresh)`: WorkdirError when the workdir is a file, a data store (or inside
  one, or inside `data.prepared`), or holds the job's data inputs where the run writes, deletes
  (old checkpoints) or, with `fresh`, moves them. Reads only; run before anything is written.
- `lock(workdir) -> Lock`: creates the workdir and takes its exclusive lock, `<workdir>/.lock`
  (`fcntl.flock`: the kernel releases it when the holder exits or dies, kill -9 included; the
  file stays and names the last holder). WorkdirError naming the holder's pid and host when
  another job holds it, or when the workdir cannot be created or written.
- `prepare(workdir, fresh)`: with `fresh`, moves its content (all but the lock and earlier
  `old-*` folders) to `old-<time>/`; never deletes.
- `WorkdirError`: one line naming the workdir (the CLI's exit code 2).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
import time
from typing import Any

from sedd_jax.data import prepare as prepare_lib
from sedd_jax.data import store as store_lib

logger = logging.getLogger("sedd_jax.train")

LOCK_FILE = ".lock"
OLD_PREFIX = "old-"
_HOLDER_READS = 20  # tries (10 ms apart) to read a holder that is still writing its line


class WorkdirError(ValueError):
  """A workdir that cannot be used (a file, a store, busy, not writable); names the path."""


def _inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
  """Whether `path` is `folder` or inside it (symlinks resolved)."""
  return path.resolve().is_relative_to(folder.resolve())


def _inputs(cfg: Any) -> list[tuple[str, pathlib.Path]]:
  """(config key, resolved path) of the job's data sources: data.fasta, data.ligand_corpus."""
  paths = [("data.fasta", cfg.data.fasta), ("data.ligand_corpus",
                                             cfg.data.get("ligand_corpus", ""))]
  return [(key, prepare_lib.resolve_path(p)) for key, p in paths if p]


def check(workdir: pathlib.Path, cfg: Any, fresh: bool) -> None:
  """Raises WorkdirError when `workdir` must not be the run folder of `cfg` (see the module
  docstring); `fresh`: the run will move the workdir's content aside."""
  # noqa below: imports jax and orbax, which `lock` and `prepare` do without.
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415

  workdir = pathlib.Path(workdir).absolute()
  again = "pass another --workdir"
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"workdir {workdir} is a file, not a folder: {again}")
  prepared = prepare_lib.resolve_path(cfg.data.prepared)
  if _inside(workdir, prepared):
    raise WorkdirError(f"workdir {workdir} is the data store data.prepared = {prepared} or "
                       f"inside it: the run would write among the store's files; {again}")
  store = next((p for p in (workdir, *workdir.parents) if store_lib.is_store(p)), None)
  if store is not None:
    raise WorkdirError(f"workdir {workdir} is the data store {store} or inside it: the run "
                       f"would write among the store's files; {again}")
  why = "the run writes there, deletes old checkpoints and --fresh moves the content aside"
  for key, path in _inputs(cfg):
    if _inside(path, workdir):
      raise WorkdirError(f"{key} = {path} is the workdir {workdir} or inside it ({why}): keep "
                         f"the training input outside the workdir or {again}")
  if _inside(prepared, workdir / ckpt_lib.CHECKPOINTS):
    raise WorkdirError(f"data.prepared = {prepared} is inside the checkpoints of the workdir "
                       f"{workdir} (step folders there are read as checkpoints, old ones are "
                       f"deleted): keep the store outside the workdir or {again}")
  if fresh and _inside(prepared, workdir):
    top = prepared.resolve().relative_to(workdir.resolve()).parts[0]
    if not top.startswith(OLD_PREFIX):
      raise WorkdirError(f"data.prepared = {prepared} is inside the workdir {workdir}, whose "
                         f"content --fresh moves to {OLD_PREFIX}<time>/: keep the store outside "
                         f"the workdir or {again}")


def _holder(fd: int) -> str:
  """'pid 123 on host h, running since ...' from the lock file; a holder that has just taken the
  lock may still be writing it (a few retries), else 'pid unknown'."""
  for _ in range(_HOLDER_READS):
    try:
      info = json.loads(os.pread(fd, 4096, 0))
      return f"pid {info['pid']} on host {info['host']}, running since {info['since']}"
    except (ValueError, KeyError, TypeError):
      time.sleep(0.01)
  return "pid unknown"


class Lock:
  """A held workdir lock (see `lock`); `release()` drops it (also done by the holder's exit)."""

  def __init__(self, fd: int | None, path: pathlib.Path):
    self._fd = fd  # None: a file system without locks (nothing held)
    self.path = path

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the only descriptor releases the flock
      self._fd = None


def lock(workdir: pathlib.Path) -> Lock:
  """Creates `workdir` (and its parents) if needed and takes its exclusive lock.

  On a file system without file locks (some NFS or Lustre mounts) the job runs unlocked, with a
  warning.

  Raises:
    WorkdirError: another process holds the lock (the message names the workdir and the
      holder's pid and host); the workdir cannot be created or written (read-only, a path
      through a file, ...).
  """
  workdir = pathlib.Path(workdir).absolute()
  path = workdir / LOCK_FILE
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"cannot write the workdir {workdir}: {e.strerror} "
                       f"({e.filename or path})") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
      os.close(fd)
      logger.warning("cannot lock %s (%s): running without the guard against a second job in "
                     "this workdir", path, e.strerror)
      return Lock(None, path)
    holder = _holder(fd)
    os.close(fd)
    raise WorkdirError(f"workdir {workdir} is in use by another training job: {holder} (it "
                       f"holds {path}); wait for it to end, stop it, or pass another --workdir"
                       ) from None
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
  return Lock(fd, path)


def prepare(workdir: pathlib.Path, fresh: bool) -> None:
  """With `fresh`, moves the workdir's content to `old-<timestamp>/` (never deletes): all but
  the lock file (held by this job) and the `old-*` folders of earlier starts."""
  if not fresh:
    return
  entries = [p for p in workdir.iterdir()
             if not p.name.startswith(OLD_PREFIX) and p.name != LOCK_FILE]
  if not entries:
    return
  dest = workdir / f"{OLD_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
  n = 0
  while dest.exists():
    n += 1
    dest = workdir / f"{OLD_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{n}"
  dest.mkdir()
  for p in entries:
    p.rename(dest / p.name)
  logger.info("--fresh: moved the previous content of %s to %s", workdir, dest)
