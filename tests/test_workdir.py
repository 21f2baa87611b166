"""The workdir's checks, lock and --fresh (`sedd_jax.training.workdir`), without a model."""

import errno
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from helpers import ROOT, train_config
from sedd_jax.training import workdir as workdir_lib

# Holds the lock of the workdir argv[1] until killed.
HOLDER = ("import pathlib, sys, time\n"
          "from sedd_jax.training import workdir\n"
          "workdir.lock(pathlib.Path(sys.argv[1]))\n"
          "print('locked', flush=True)\n"
          "time.sleep(600)\n")


def busy_message(work, pid: int) -> str:
  """The exact WorkdirError of `lock(work)` while process `pid` on this host holds it (its
  start time from the lock file)."""
  since = json.loads((work / ".lock").read_text())["since"]
  return (f"workdir {work} is in use by another training job: pid {pid} on host "
          f"{socket.gethostname()}, running since {since} (it holds {work / '.lock'}); wait for "
          "it to end, stop it, or pass another --workdir")


def test_prepare_moves_the_content_aside_but_the_lock_and_deletes_nothing(tmp_path):
  work = tmp_path / "run"
  lock = workdir_lib.lock(work)  # creates it
  try:
    workdir_lib.prepare(work, fresh=True)  # only the lock: nothing to move
    assert [p.name for p in work.iterdir()] == [".lock"]
    (work / "metrics.jsonl").write_text("x")
    (work / "checkpoints").mkdir()
    workdir_lib.prepare(work, fresh=False)  # resuming: untouched
    assert sorted(p.name for p in work.iterdir()) == [".lock", "checkpoints", "metrics.jsonl"]
    workdir_lib.prepare(work, fresh=True)
    workdir_lib.prepare(work, fresh=True)  # only old-* and the lock left: nothing to move again
    old = [p for p in work.iterdir() if p.name != ".lock"]
    assert len(old) == 1 and old[0].name.startswith("old-")
    assert sorted(p.name for p in old[0].iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert (old[0] / "metrics.jsonl").read_text() == "x"
    # The lock did not move: another job still finds it held.
    with pytest.raises(workdir_lib.WorkdirError, match="is in use by another training job"):
      workdir_lib.lock(work)
  finally:
    lock.release()


def test_a_held_lock_names_its_holder_and_is_free_once_the_holder_is_killed(tmp_path):
  """A process holds the lock: taking it fails at once, naming the holder's pid and host, and
  writes nothing; after kill -9 of the holder the lock can be taken (the kernel released it)."""
  work = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(work)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    content = (work / ".lock").read_bytes()
    with pytest.raises(workdir_lib.WorkdirError) as e:
      workdir_lib.lock(work)
    assert str(e.value) == busy_message(work, holder.pid)
    assert (work / ".lock").read_bytes() == content and os.listdir(work) == [".lock"]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
  lock = workdir_lib.lock(work)
  try:
    assert json.loads((work / ".lock").read_text())["pid"] == os.getpid()
  finally:
    lock.release()
  workdir_lib.lock(work).release()  # released: free again


def test_lock_of_a_workdir_that_cannot_be_written_is_one_error(tmp_path, monkeypatch):
  """The kernel refuses to create the lock file (a read-only workdir: EACCES, which chmod
  cannot make happen for root, so the refusal is simulated at os.open for that path)."""
  work = tmp_path / "run"
  work.mkdir()
  real_open = os.open

  def refuse(path, *args, **kw):
    if str(path).startswith(str(work)):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    return real_open(path, *args, **kw)

  monkeypatch.setattr(os, "open", refuse)
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.lock(work)
  assert str(e.value) == f"cannot write the workdir {work}: Permission denied ({work / '.lock'})"
  (tmp_path / "f").write_text("")
  with pytest.raises(workdir_lib.WorkdirError, match=re.escape(  # a path through a file
      f"cannot write the workdir {tmp_path / 'f' / 'run'}: Not a directory")):
    workdir_lib.lock(tmp_path / "f" / "run")


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with caplog.at_level("WARNING"):
    workdir_lib.lock(tmp_path).release()
  assert (f"cannot lock {tmp_path / '.lock'} (No locks available): running without the guard "
          "against a second job in this workdir") in caplog.text


def _check(work, cfg, fresh=False):
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.check(work, cfg, fresh)
  return str(e.value)


def test_check_refuses_a_file_a_store_and_a_workdir_holding_the_data_inputs(tmp_path, store):
  cfg = train_config(store)
  again = "pass another --workdir"
  (tmp_path / "file").write_text("x")
  assert _check(tmp_path / "file", cfg) == (
    f"workdir {tmp_path / 'file'} is a file, not a folder: {again}")
  for work in (store, store / "train", store / "new"):  # data.prepared, or in it
    assert _check(work, cfg) == (
      f"workdir {work} is the data store data.prepared = {store} or inside it: the run would "
      f"write among the store's files; {again}")
  other = train_config(tmp_path / "elsewhere")  # a store that is not this config's
  assert _check(store / "valid", other) == (
    f"workdir {store / 'valid'} is the data store {store} or inside it: the run would write "
    f"among the store's files; {again}")
  why = "the run writes there, deletes old checkpoints and --fresh moves the content aside"
  fasta = tmp_path / "run" / "in" / "x.fasta"
  for work in (tmp_path / "run", fasta):  # data.fasta inside the workdir, or the workdir itself
    cfg.data.fasta = str(fasta)
    assert _check(work, cfg) == (
      f"data.fasta = {fasta} is the workdir {work} or inside it ({why}): keep the training "
      f"input outside the workdir or {again}")
  cfg.data.fasta, cfg.data.ligand_corpus = str(tmp_path / "x.fasta"), str(fasta)
  assert _check(tmp_path / "run", cfg).startswith(f"data.ligand_corpus = {fasta} is the workdir")


def test_check_refuses_a_store_in_the_checkpoints_or_one_that_fresh_would_move(tmp_path):
  work = tmp_path / "run"
  cfg = train_config(work / "checkpoints" / "0")  # a step folder: read as a checkpoint
  assert _check(work, cfg) == (
    f"data.prepared = {work / 'checkpoints' / '0'} is inside the checkpoints of the workdir "
    f"{work} (step folders there are read as checkpoints, old ones are deleted): keep the "
    "store outside the workdir or pass another --workdir")
  cfg = train_config(work / "data" / "store")
  workdir_lib.check(work, cfg, fresh=False)  # resuming leaves it where it is
  assert _check(work, cfg, fresh=True) == (
    f"data.prepared = {work / 'data' / 'store'} is inside the workdir {work}, whose content "
    "--fresh moves to old-<time>/: keep the store outside the workdir or pass another --workdir")
  workdir_lib.check(work, train_config(work / "old-1" / "store"), fresh=True)  # not moved
  workdir_lib.check(work, train_config(tmp_path / "store"), fresh=True)
