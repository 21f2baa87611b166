"""The training job's runtime: multi-process start, workdir, stop signals, batch prefetching.

- `maybe_initialize_distributed()`: `jax.distributed.initialize()` when the environment describes
  a multi-process job (`JAX_COORDINATOR_ADDRESS`, or SLURM with more than one task).
- `prepare_workdir(workdir, fresh)`: creates it; `--fresh` moves its content to `old-<time>/`.
- `StopFlag`: set by SIGTERM / SIGINT; `agreed()` is a collective over all processes.
- `Prefetcher`: host batches drawn and placed on the devices one step ahead, in a thread.
- `host_value(x)`: a jax.Array's full value on every process.
"""

from __future__ import annotations

import logging
import os
import pathlib
import queue
import signal
import threading
import time
from typing import Any, Callable

logger = logging.getLogger("sedd_jax.train")


def maybe_initialize_distributed() -> bool:
  """Calls jax.distributed.initialize() when the environment describes a multi-process job."""
  import jax  # noqa: PLC0415

  env = os.environ
  multi_slurm = "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
  if "JAX_COORDINATOR_ADDRESS" not in env and not multi_slurm:
    return False
  kwargs = {}
  if "JAX_NUM_PROCESSES" in env:
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in env:
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  jax.distributed.initialize(**kwargs)
  logger.info("jax.distributed: process %d of %d, %d local / %d global devices",
              jax.process_index(), jax.process_count(), jax.local_device_count(),
              jax.device_count())
  return True


def prepare_workdir(workdir: pathlib.Path, fresh: bool) -> None:
  """Creates the workdir; with `fresh`, moves its content to `old-<timestamp>/` (never deletes)."""
  workdir.mkdir(parents=True, exist_ok=True)
  if not fresh:
    return
  entries = [p for p in workdir.iterdir() if not p.name.startswith("old-")]
  if not entries:
    return
  dest = workdir / f"old-{time.strftime('%Y%m%d-%H%M%S')}"
  n = 0
  while dest.exists():
    n += 1
    dest = workdir / f"old-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
  dest.mkdir()
  for p in entries:
    p.rename(dest / p.name)
  logger.info("--fresh: moved the previous content of %s to %s", workdir, dest)


def _signal_name(signum: int) -> str | None:
  """"SIGTERM" for signal.SIGTERM, ...; None for 0 (no signal)."""
  return signal.Signals(signum).name if signum else None


class StopFlag:
  """Set by SIGTERM / SIGINT; the training loop asks `agreed(step)` between steps."""

  CHECK_EVERY = 10  # steps between the processes' collective comparisons of their flags

  def __init__(self):
    self.signum = 0  # the signal received (0: none)
    self._previous: dict[int, Any] = {}

  @property
  def reason(self) -> str | None:
    """The received signal's name (e.g. "SIGTERM"), None before one."""
    return _signal_name(self.signum)

  def __bool__(self) -> bool:
    return self.signum != 0

  def agreed(self, step: int = 0) -> str | None:
    """The signal's name if this or ANY other process received one, else None.

    With several processes this is a collective (an all-gather of the signal numbers, which
    waits for the queued step: one host stall), so it runs only when `step` is a multiple of
    `CHECK_EVERY` and answers None in between: every process must call it at the same steps,
    and all get the same answer, so all stop after the same step (at most CHECK_EVERY - 1
    steps after the signal). One process answers at every step.
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.experimental import multihost_utils  # noqa: PLC0415

    if jax.process_count() == 1:
      return self.reason
    if step % self.CHECK_EVERY:
      return None
    signum = int(multihost_utils.process_allgather(np.int32(self.signum)).max())
    return _signal_name(signum)

  def _handler(self, signum, frame):
    if self and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: abort at once
    self.signum = int(signum)
    logger.warning("%s received: finishing the current step, then checkpointing and stopping "
                   "(Ctrl-C again aborts without a checkpoint)", self.reason)

  def install(self) -> None:
    if threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handler)

  def uninstall(self) -> None:
    for sig, old in self._previous.items():
      signal.signal(sig, old)
    self._previous.clear()


class Prefetcher:
  """Pulls host batches in a background thread and puts them on the devices one step ahead.

  Yields (device_batch, data_state_after, padded_tokens, real_tokens), where
  `data_state_after` is the iterator's `get_state()` right after this batch was drawn (what a
  checkpoint taken after training on it must store); `count(batch) -> (padded, real)`.
  """

  def __init__(self, iterator, put: Callable[[dict], dict],
               count: Callable[[dict], tuple[Any, Any]], depth: int = 2):
    self._it = iterator
    self._put = put
    self._count = count
    self._q: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
    self._thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        batch = next(self._it)
        state = self._it.get_state()
        padded, real = self._count(batch)
        item = (self._put(batch), state, float(padded), float(real))
        while not self._stop.is_set():
          try:
            self._q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
      self._q.put(e)

  def next(self):
    item = self._q.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)


def host_value(x):
  """The full value of the jax.Array `x` as numpy on every process (gathered from the other
  processes when it is sharded across them)."""
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  return multihost_utils.process_allgather(x)
