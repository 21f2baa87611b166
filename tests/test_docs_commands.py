"""Every command in the ```bash blocks of README.md and docs/*.md is exercised.

Each command is split out of its block (`&&`, `;` and new lines separate commands; `\\` joins
lines; `#` starts a comment), then:

* every `python -m MODULE ...` / `python SCRIPT.py ...` is PARSED: run in a subprocess from the
  repository root with argparse's `parse_args` and absl's flag parsing patched to stop right
  after a successful parse (so the module must exist, every flag must be accepted, a
  `--config.KEY=VALUE` must name a real key with a valid value, and the resulting config must
  pass `sedd_jax.config.validate`), without training or sampling anything;
* the cheap ones also RUN, in document order, in one sandbox folder (`configs/`, `data/`,
  `tests/`, `benchmarks/` linked from the checkout): training with a `tiny` config (a few steps,
  via extra `--config.` overrides), data preparation (output redirected into the sandbox),
  sampling and evaluation of a run folder that an earlier command created (fewer steps / draws),
  the export of such a run,
  and the shell helpers `printf`, `echo`, `mkdir`;
* `pip install` lines are checked against pyproject's extras, `python -m pytest` is this suite.

A command of any other kind fails the test: teach this file about it.
"""

import json
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from helpers import ROOT, subprocess_env

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK_RE = re.compile(r"^```bash[ \t]*\n(.*?)^```", re.S | re.M)
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_HELPERS = {"printf", "echo", "mkdir"}
SEPARATORS = {"&&", ";", "||", "|"}

# Extra flags that make a documented command cheap (appended, so they win over the documented
# values); training commands also get a few steps only.
TRAIN_SHRINK = [
  "--config.training.steps=3", "--config.training.batch_size=4", "--config.training.log_every=1",
  "--config.training.eval_every=0", "--config.training.sample_every=0",
  "--config.training.ckpt_every=3", "--config.wandb.mode=disabled",
]
SAMPLE_SHRINK = ["--steps", "2"]
EVAL_SHRINK = ["--num-samples", "2", "--max-sequences", "6"]

# Runs the target with parsing patched to exit 0 after a successful parse (exit 2 on a bad
# flag, as the CLIs do); absl-parsed configs are validated too.
PARSE_ONLY = r"""
import argparse, runpy, sys

class _Parsed(BaseException):
  pass

_parse_args = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
  _parse_args(self, args, namespace)
  raise _Parsed()
argparse.ArgumentParser.parse_args = parse_args

try:
  from absl import flags as _flags
except ImportError:
  _flags = None
if _flags is not None:
  _call = _flags.FlagValues.__call__
  def call(self, argv, known_only=False):
    out = _call(self, argv, known_only)
    if not known_only:
      if "config" in self and self["config"].value is not None:
        from sedd_jax import config as config_lib
        config_lib.validate(self["config"].value)
      raise _Parsed()
    return out
  _flags.FlagValues.__call__ = call

kind, target, *args = sys.argv[1:]
sys.argv = [target, *args]
try:
  if kind == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
  else:
    sys.path.insert(0, ".")
    runpy.run_path(target, run_name="__main__")
except _Parsed:
  print("PARSED")
  sys.exit(0)
sys.exit("the command finished without parsing any arguments")
"""


# Runs argparse CLIs (sample, evaluate, data.prepare) one after the other in ONE process, so
# that jax, flax and orbax are imported once: one JSON argv per stdin line; after each command
# a line `@@DONE <exit code>` on stdout (tracebacks and logs go to stderr).
RUNNER = r"""
import json, runpy, sys, traceback
for line in sys.stdin:
  module, *args = json.loads(line)
  sys.argv = [module, *args]
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=False)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException:
    traceback.print_exc()
    code = 1
  sys.stderr.flush()
  print(f"\n@@DONE {code}", flush=True)
"""
IN_RUNNER = {"sedd_jax.sample", "sedd_jax.evaluate", "sedd_jax.data.prepare", "sedd_jax.export"}


class Runner:
  """The RUNNER process; `run(module, args)` -> (exit code, recent stderr)."""

  def __init__(self, cwd: pathlib.Path):
    self.log = cwd / "runner.log"
    self._err = open(self.log, "w")
    self.proc = subprocess.Popen([sys.executable, "-c", RUNNER], cwd=cwd, env=_env(),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._err, text=True)

  def run(self, module: str, args: list[str]) -> tuple[int, str]:
    start = self.log.stat().st_size
    self.proc.stdin.write(json.dumps([module, *args]) + "\n")
    self.proc.stdin.flush()
    for line in self.proc.stdout:
      if line.startswith("@@DONE "):
        self._err.flush()
        with open(self.log) as f:
          f.seek(start)
          return int(line.split()[1]), f.read()
    return -1, f"the runner died (rc {self.proc.wait()})"

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)
    self._err.close()


class Command:
  """One documented command: where it is, its words, env assignments and output redirect."""

  def __init__(self, doc: pathlib.Path, block: int, line: int, words: list[str]):
    self.doc, self.block, self.line = doc, block, line
    self.env = {}
    while words and ENV_RE.match(words[0]):
      k, v = words.pop(0).split("=", 1)
      self.env[k] = v
    self.redirect = None
    if ">" in words:
      i = words.index(">")
      self.redirect = words[i + 1]
      words = words[:i]
    self.words = words

  @property
  def id(self) -> str:
    return f"{self.doc.relative_to(ROOT)}:{self.line}:{' '.join(self.words[:3])[:60]}"

  @property
  def python_target(self):
    """('module', name) / ('script', path) / None, and the arguments."""
    w = self.words
    if w and w[0] in ("python", "python3"):
      if len(w) > 2 and w[1] == "-m":
        return ("module", w[2]), w[3:]
      if len(w) > 1 and w[1].endswith(".py"):
        return ("script", w[1]), w[2:]
    return None, []

  def __repr__(self):
    return self.id


def split_block(text: str) -> list[tuple[int, list[str]]]:
  """(line offset, words) of each command of a bash block."""
  text = text.replace("\\\n", " ")
  out = []
  for offset, line in enumerate(text.splitlines()):
    lex = shlex.shlex(line, posix=True, punctuation_chars="&;|>")
    lex.whitespace_split = True
    lex.commenters = "#"
    words, cur = [], []
    for tok in lex:
      if tok in SEPARATORS:
        words.append(cur)
        cur = []
      else:
        cur.append(tok)
    words.append(cur)
    out += [(offset, w) for w in words if w]
  return out


def documented_commands() -> list[Command]:
  cmds = []
  for doc in DOCS:
    text = doc.read_text()
    for b, m in enumerate(BLOCK_RE.finditer(text)):
      first = text.count("\n", 0, m.start(1)) + 1
      for offset, words in split_block(m.group(1)):
        cmds.append(Command(doc, b, first + offset, words))
  return cmds


COMMANDS = documented_commands()
PYTHON_COMMANDS = [c for c in COMMANDS if c.python_target[0] is not None
                   and c.python_target[0][1] != "pytest"]


def _env(extra=None):
  # One CPU device (conftest simulates 8 for the mesh tests), compiled without optimisation
  # passes (helpers.FAST_XLA_FLAG: 2-3x faster compiles).
  return subprocess_env(fast=True, WANDB_MODE="disabled", **(extra or {}))


def test_docs_have_commands():
  assert len(COMMANDS) >= 10, COMMANDS
  readme = (ROOT / "README.md").read_text()
  for module in ("sedd_jax.train", "sedd_jax.sample", "sedd_jax.evaluate", "sedd_jax.convert",
                 "sedd_jax.data.prepare"):
    assert f"python -m {module}" in readme, f"README.md shows no `python -m {module}`"


def test_every_command_is_known():
  unknown = []
  for c in COMMANDS:
    target, _ = c.python_target
    if target is None and c.words[0] not in SHELL_HELPERS | {"pip"}:
      unknown.append(c.id)
    if c.redirect is not None and c.words[0] not in SHELL_HELPERS:
      unknown.append(c.id + " (output redirect)")
  assert not unknown, f"commands this test cannot check: {unknown}"


def test_pip_commands_name_real_extras():
  extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
               ["optional-dependencies"])
  pips = [c for c in COMMANDS if c.words[0] == "pip"]
  assert pips
  for c in pips:
    assert c.words[1] == "install", c.id
    for w in c.words[2:]:
      m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", w)
      if m and m.group(1):
        missing = set(m.group(1).split(",")) - extras
        assert not missing, f"{c.id}: no extra {missing} in pyproject.toml"
      elif w not in ("-e", "-q", "-U", "--upgrade", ".") and not w.startswith("jupyter"):
        raise AssertionError(f"{c.id}: unexpected pip argument {w!r}")


@pytest.mark.parametrize("cmd", PYTHON_COMMANDS, ids=lambda c: c.id)
def test_command_parses(cmd):
  (kind, target), args = cmd.python_target
  if kind == "script":
    assert (ROOT / target).is_file(), f"{cmd.id}: no such script {target}"
  res = subprocess.run([sys.executable, "-c", PARSE_ONLY, kind, target, *args], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
  parsed = "PARSED" in res.stdout or ("--help" in args and "usage" in res.stdout.lower())
  assert res.returncode == 0 and parsed, (
    f"{cmd.id}: `{' '.join(cmd.words)}` does not parse (rc {res.returncode}):\n"
    f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")


def _flag_value(args, name):
  for i, a in enumerate(args):
    if a == name and i + 1 < len(args):
      return args[i + 1]
    if a.startswith(name + "="):
      return a.split("=", 1)[1]
  return None


def _runnable(cmd: Command, sandbox: pathlib.Path):
  """The argv to run `cmd` cheaply in the sandbox, or None when it is parse-only."""
  target, args = cmd.python_target
  if target is None:
    return cmd.words if cmd.words[0] in SHELL_HELPERS else None
  kind, name = target
  if kind != "module" or cmd.env:
    return None
  if name == "sedd_jax.train":
    spec = _flag_value(args, "--config") or ""
    if spec.split(":")[0] in ("configs/uniref50.py", "configs/protein_ligand.py") and \
        spec.endswith(":tiny"):
      return ["python", "-m", name, *args, *TRAIN_SHRINK]
    return None
  if name == "sedd_jax.data.prepare":
    out = _flag_value(args, "--output")
    if out is None or pathlib.Path(out).is_absolute():
      return None
    rest = [a for i, a in enumerate(args)
            if a != "--output" and not a.startswith("--output=")
            and not (i > 0 and args[i - 1] == "--output")]
    return ["python", "-m", name, *rest, "--output", str(sandbox / out)]
  if name == "sedd_jax.export":
    src = _flag_value(args, "--workdir")
    return ["python", "-m", name, *args] if src and (sandbox / src).exists() else None
  if name in ("sedd_jax.sample", "sedd_jax.evaluate"):
    src = _flag_value(args, "--workdir") or _flag_value(args, "--checkpoint")
    if src is None or not (sandbox / src).exists():
      return None
    return ["python", "-m", name, *args,
            *(SAMPLE_SHRINK if name == "sedd_jax.sample" else EVAL_SHRINK)]
  return None


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
  box = tmp_path_factory.mktemp("docs_sandbox")
  for name in ("configs", "tests", "benchmarks", "scripts"):
    if (ROOT / name).exists():
      (box / name).symlink_to(ROOT / name)
  # data/ holds links to the bundled files, but not `prepared/`: prepared stores named in the
  # docs are written into the sandbox, the default store resolves to the checkout's.
  (box / "data").mkdir()
  for entry in (ROOT / "data").iterdir():
    if entry.name != "prepared":
      (box / "data" / entry.name).symlink_to(entry)
  return box


def _run_block(cmds: list[Command], sandbox: pathlib.Path, runner: Runner):
  """Runs the runnable commands of one bash block in order; (ran ids, failure messages)."""
  ran, failures = [], []
  for cmd in cmds:
    argv = _runnable(cmd, sandbox)
    if argv is None:
      continue
    if argv[0] == "python" and argv[2] in IN_RUNNER:
      rc, err = runner.run(argv[2], argv[3:])
    elif argv[0] == "python":
      res = subprocess.run([sys.executable, *argv[1:]], cwd=sandbox, env=_env(),
                           capture_output=True, text=True, timeout=300)
      rc, err = res.returncode, res.stderr
    else:
      line = shlex.join(argv) + (f" > {shlex.quote(cmd.redirect)}" if cmd.redirect else "")
      res = subprocess.run(["bash", "-c", line], cwd=sandbox, env=_env(), capture_output=True,
                           text=True, timeout=60)
      rc, err = res.returncode, res.stderr
    ran.append(cmd.id)
    if rc != 0:
      failures.append(f"{cmd.id}: `{shlex.join(argv)}` exited {rc}:\n{err[-3000:]}")
      break  # later commands of the block depend on this one
  return ran, failures


@pytest.mark.slow
def test_cheap_commands_run(sandbox):
  """The cheap documented commands in one sandbox, in document order: the README's set-up
  block first (it trains `runs/tiny`, which later blocks sample from). Training runs in a
  process of its own (absl flags are defined once per process), the argparse CLIs in one
  shared RUNNER process."""
  blocks: dict[tuple, list[Command]] = {}
  for cmd in COMMANDS:
    blocks.setdefault((cmd.doc, cmd.block), []).append(cmd)
  ran, failures = [], []
  runner = Runner(sandbox)
  try:
    for cmds in blocks.values():
      r, f = _run_block(cmds, sandbox, runner)
      ran += r
      failures += f
  finally:
    runner.close()
  assert not failures, "\n\n".join(failures)
  # The README's set-up chain did train and sample.
  assert any("sedd_jax.train" in r for r in ran) and any("sedd_jax.sample" in r for r in ran)
  assert (sandbox / "runs" / "tiny" / "samples.fasta").is_file(), ran
  assert (sandbox / "runs" / "tiny" / "metrics.jsonl").is_file(), ran
