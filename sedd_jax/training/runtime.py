"""The training job's runtime: multi-process start, stop signals, batch prefetching.

- `maybe_initialize_distributed()`: `jax.distributed.initialize()` when the environment describes
  a multi-process job (`JAX_COORDINATOR_ADDRESS`, or SLURM with more than one task).
- `process_max(value)`: the largest value over all processes (a collective).
- `StopFlag`: set by SIGTERM / SIGINT (a Ctrl-C after it aborts at once, exit code
  EXIT_ABORTED); `agreed()` is a collective over all processes.
- `Prefetcher`: host batches drawn and placed on the devices one step ahead, in a thread.
- `host_value(x)`: a jax.Array's full value on every process.
"""

from __future__ import annotations

import logging
import os
import pathlib
import queue
import signal
import socket
import threading
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


def process_max(value: int) -> int:
  """The largest of the processes' `value`s: with several processes a collective (an
  all-gather; every process must call it), with one `value` itself."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.process_allgather(np.int32(value)).max())


def _signal_name(signum: int) -> str | None:
  """"SIGTERM" for signal.SIGTERM, ...; None for 0 (no signal)."""
  return signal.Signals(signum).name if signum else None


def _no_op(signum, frame):
  """The Python-level handler while a StopFlag is installed (its watcher thread acts)."""


EXIT_ABORTED = 130  # a Ctrl-C after the first signal: 128 + SIGINT, a shell's interrupted job
_STOP_WATCHING = 0  # the byte that ends the watcher (signal numbers start at 1)


class StopFlag:
  """Set by SIGTERM / SIGINT; the training loop asks `agreed(step)` between steps.

  `install()` (from the main thread) routes both signals through `signal.set_wakeup_fd` to a
  watcher thread, which acts at once even while the main thread waits in native code (a
  compilation, a device step, a checkpoint write). The first signal sets the flag: the loop
  finishes the current step, checkpoints and stops. A Ctrl-C after it aborts: one log line
  naming the newest complete checkpoint in `checkpoints` (when set), then `os._exit` with
  EXIT_ABORTED, without a final checkpoint and without the interpreter's shutdown (which
  crashed under running jax and orbax threads). Complete checkpoints are left as they are; a
  save cut short leaves only orbax's temporary folder, removed at the next start.
  """

  CHECK_EVERY = 10  # steps between the processes' collective comparisons of their flags

  def __init__(self, checkpoints: pathlib.Path | None = None):
    self.signum = 0  # the first signal received (0: none)
    self.checkpoints = checkpoints
    self._previous: dict[int, Any] = {}
    self._wakeup: tuple[socket.socket, socket.socket, int] | None = None
    self._watcher: threading.Thread | None = None

  @property
  def reason(self) -> str | None:
    """The received signal's name (e.g. "SIGTERM"), None before one."""
    return _signal_name(self.signum)

  def __bool__(self) -> bool:
    return self.signum != 0

  def agreed(self, step: int = 0) -> str | None:
    """The signal's name if this or ANY other process received one, else None.

    With several processes this is a collective (`process_max` of the signal numbers, which
    waits for the queued step: one host stall), so it runs only when `step` is a multiple of
    `CHECK_EVERY` and answers None in between: every process must call it at the same steps,
    and all get the same answer, so all stop after the same step (at most CHECK_EVERY - 1
    steps after the signal). One process answers at every step.
    """
    import jax  # noqa: PLC0415

    if jax.process_count() == 1:
      return self.reason
    if step % self.CHECK_EVERY:
      return None
    return _signal_name(process_max(self.signum))

  def on_signal(self, signum: int) -> None:
    """What the watcher does with each SIGTERM / SIGINT: the first sets the flag; a SIGINT after
    it aborts the process (see the class docstring); a later SIGTERM changes nothing."""
    if not self:
      self.signum = int(signum)
      logger.warning("%s received: finishing the current step, then checkpointing and stopping "
                     "(Ctrl-C again aborts without a checkpoint)", self.reason)
    elif signum == signal.SIGINT:
      self._abort()

  def _newest_checkpoint(self) -> str:
    if self.checkpoints is None:
      return "the newest complete checkpoint is kept"
    from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415

    try:
      step_dir = ckpt_lib.resolve_checkpoint_dirs(self.checkpoints)[0]
    except FileNotFoundError:
      return f"no checkpoint in {self.checkpoints} yet"
    return f"the newest complete checkpoint is step {step_dir.name} ({step_dir})"

  def _abort(self) -> None:
    logger.error("second interrupt: stopped at once without a final checkpoint (exit code %d); "
                 "%s: run the same command to resume", EXIT_ABORTED, self._newest_checkpoint())
    logging.shutdown()  # flushes the log handlers
    os._exit(EXIT_ABORTED)

  def _watch(self, reader: socket.socket) -> None:
    while True:
      data = reader.recv(64)
      for signum in data:
        if signum == _STOP_WATCHING:
          return
        if signum in (signal.SIGTERM, signal.SIGINT):
          self.on_signal(signum)
      if not data:
        return

  def install(self) -> None:
    """Routes SIGTERM and SIGINT to this flag (from the main thread; elsewhere nothing)."""
    if threading.current_thread() is not threading.main_thread():
      return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._wakeup = (reader, writer,
                    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False))
    self._watcher = threading.Thread(target=self._watch, args=(reader,), name="stop-signals",
                                     daemon=True)
    self._watcher.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, _no_op)

  def uninstall(self) -> None:
    """Restores the previous handlers, after the signals received so far are acted on."""
    for sig, old in self._previous.items():
      signal.signal(sig, old)
    self._previous.clear()
    if self._wakeup is None:
      return
    reader, writer, previous_fd = self._wakeup
    self._wakeup = None
    signal.set_wakeup_fd(previous_fd)
    writer.send(bytes([_STOP_WATCHING]))
    self._watcher.join()
    reader.close()
    writer.close()


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
