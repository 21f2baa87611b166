"""python -m sedd_jax.sample: determinism, headers, conditioning flags, sampler flags
(first_hitting, draw, remask; checked by the sampler), report, bad input, outputs that would
lose something, a damaged newest checkpoint."""

import functools
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

from helpers import (ROOT, UNIREF50, cli_fails, read_records, sample_config, save_checkpoint,
                     subprocess_env)
from sedd_jax import sample as sample_cli
from sedd_jax.data import tokenizers
from sedd_jax.training import checkpoint as ckpt_lib

STANDARD = set(tokenizers.STANDARD_RESIDUES)
_fails = functools.partial(cli_fails, sample_cli.main)


def test_same_seed_same_output_and_headers(workdir, tmp_path):
  args = ["--workdir", str(workdir), "--num", "5", "--length", "20", "--steps", "6",
          "--batch-size", "4", "--seed", "3"]
  assert sample_cli.main(args + ["--out", str(tmp_path / "a.fasta"), "--report"]) == 0
  assert sample_cli.main(args + ["--out", str(tmp_path / "b.fasta")]) == 0
  a, b = read_records(tmp_path / "a.fasta"), read_records(tmp_path / "b.fasta")
  assert [s for _, s in a] == [s for _, s in b]
  assert len(a) == 5
  for head, seq in a:
    assert len(seq) == 20 and set(seq) <= STANDARD
    for field in ("length=20", "steps=6", "predictor=analytic", "seed=3", "batch_size=4",
                  "weights=ema", "cond=none"):
      assert field in head
  assert len({s for _, s in a}) > 1
  rep = json.loads((tmp_path / "a.report.json").read_text())
  assert rep["num_samples"] == 5 and rep["num_reference"] > 0
  assert (tmp_path / "a.report.png").stat().st_size > 0


def test_the_cli_samples_are_the_apis(workdir, tmp_path):
  """The FASTA sequences == sedd_jax.load(run).sample(...) with the same seed and settings,
  unconditional and with --prefix/--motif (a drawn start), whatever --batch-size."""
  import sedd_jax

  model = sedd_jax.load(workdir)
  base = ["--workdir", str(workdir), "--num", "5", "--length", "20", "--steps", "6",
          "--seed", "3"]
  cases = [([], {}), (["--prefix", "MK", "--motif", "WW@?", "PP@12"],
                      {"prefix": "MK", "motifs": ["WW@?", "PP@12"]})]
  for flags, kwargs in cases:
    got = []
    for bs in ("2", "5"):
      out = tmp_path / f"s{bs}.fasta"
      assert sample_cli.main(base + flags + ["--batch-size", bs, "--out", str(out)]) == 0
      got.append([s for _, s in read_records(out)])
    want = model.sample(5, length=20, steps=6, seed=3, batch_size=4, **kwargs)
    assert got[0] == got[1] == list(want), flags
  assert all(s.startswith("MK") and s[12:14] == "PP" and "WW" in s[2:] for s in want)


def test_conditioning_flags(workdir, tmp_path):
  out = tmp_path / "c.fasta"
  assert sample_cli.main(["--workdir", str(workdir), "--num", "3", "--length", "24",
                          "--prefix", "MKV", "--suffix", "GG", "--motif", "WWW@10", "HH",
                          "--out", str(out), "--cached", "--predictor", "euler"]) == 0
  for head, seq in read_records(out):
    assert seq.startswith("MKV") and seq.endswith("GG") and seq[10:13] == "WWW"
    assert "HH" in seq[3:22] and "cond=prefix+suffix+motif" in head and "cached=1" in head
  tpl = tmp_path / "t.fasta"
  tpl.write_text(">t1\nMA__G<mask>K\n>t2\nW_W\n")
  assert sample_cli.main(["--workdir", str(workdir), "--num", "2", "--template", str(tpl),
                          "--out", str(out)]) == 0
  recs = read_records(out)
  assert len(recs) == 4
  for head, seq in recs[:2]:
    assert len(seq) == 7 and seq[:2] == "MA" and seq[4] == "G" and seq[6] == "K"
    assert "template=t1" in head
  assert recs[2][1][0] == "W" and recs[2][1][2] == "W" and len(recs[3][1]) == 3
  inf = tmp_path / "i.fasta"
  inf.write_text(">p1 spans=2:5,8:9\nMKVLAAGGST\n")
  assert sample_cli.main(["--workdir", str(workdir), "--num", "2", "--infill", str(inf),
                          "--out", str(out)]) == 0
  for _, seq in read_records(out):
    assert seq[:2] == "MK" and seq[5:8] == "AGG" and seq[9] == "T"


def test_lengths_file_and_from_data(workdir, tmp_path):
  lens = tmp_path / "lengths.txt"
  lens.write_text("5\n12\n9\n")
  out = tmp_path / "l.fasta"
  assert sample_cli.main(["--workdir", str(workdir), "--lengths", str(lens), "--out", str(out),
                          "--steps", "4"]) == 0
  assert [len(s) for _, s in read_records(out)] == [5, 12, 9]
  assert sample_cli.main(["--workdir", str(workdir), "--lengths", "from-data", "--num", "4",
                          "--out", str(out), "--steps", "4"]) == 0
  assert all(0 < len(s) <= 48 for _, s in read_records(out))


def test_bad_input_clear_errors(workdir, tmp_path, caplog):
  out = str(tmp_path / "x.fasta")
  base = ["--workdir", str(workdir), "--out", out]
  _fails(base + ["--length", "49"], caplog, "over the model's maximum length 48")
  _fails(base + ["--length", "10", "--motif", "MKVLAAGGSTEE@0"], caplog,
         "longer than the scaffold length 10")
  _fails(base + ["--length", "10", "--motif", "MKV@0", "AAG@2"], caplog, "overlap")
  tpl = tmp_path / "long.fasta"
  tpl.write_text(">t\n" + "_" * 60 + "\n")
  _fails(base + ["--template", str(tpl)], caplog, "over the model's maximum length")
  _fails(base + ["--length", "10", "--prefix", "MK#"], caplog, "invalid character")
  _fails(["--workdir", str(tmp_path / "nothing"), "--out", out], caplog, "does not exist")
  # A checkpoint whose weights are of another model shape than its config says.
  cfg = sample_config(tmp_path)
  bad_cfg = sample_config(tmp_path, hidden=64)
  bad = save_checkpoint(tmp_path / "bad", cfg, stored_cfg=bad_cfg)
  _fails(["--workdir", str(bad), "--out", out], caplog, "another model shape")
  # --config naming another model shape than the checkpoint.
  _fails(base + ["--config", f"{UNIREF50}:small"], caplog,
         "model.hidden_size: checkpoint 32, config 768")


def test_flags_are_checked_before_the_model_is_loaded(workdir, tmp_path, caplog, monkeypatch):
  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the flags were checked")

  monkeypatch.setattr(ckpt_lib, "load_inference_checkpoint", no_load)
  base = ["--workdir", str(workdir), "--out", str(tmp_path / "x.fasta")]
  _fails(base + ["--num", "0"], caplog, "--num must be >= 1")
  _fails(base + ["--steps", "0"], caplog, "--steps must be >= 1")
  _fails(base + ["--eps", "0"], caplog, "--eps must lie in (0, 1)")
  _fails(base + ["--length", "49"], caplog, "over the model's maximum length 48")
  _fails(base + ["--length", "10", "--prefix", "MK#"], caplog, "invalid character")
  _fails(base + ["--lengths", str(tmp_path / "none.txt")], caplog, "no such file")
  _fails(base + ["--task", "ligand_given_protein"], caplog, "protein-ligand checkpoints only")
  _fails(base + ["--length", "10", "--motif", "XYZ@5"], caplog, "--motif fixes X, Z (0-based "
         "positions [5, 7]): only the 20 standard amino acids are generated unless rare residues "
         "are allowed; add --allow-rare or replace them")


def test_rare_fixed_residues_need_allow_rare(workdir, tmp_path, caplog):
  """A fixed X/B/U/Z/O is refused without --allow-rare, whatever fixes it, and kept with it."""
  base = ["--workdir", str(workdir), "--out", str(tmp_path / "r.fasta"), "--length", "12",
          "--steps", "4", "--num", "2"]
  _fails(base + ["--prefix", "MKB"], caplog, "--prefix fixes B (0-based positions [2])")
  _fails(base + ["--suffix", "UGG"], caplog, "--suffix fixes U (0-based positions [9])")
  tpl = tmp_path / "t.fasta"
  tpl.write_text(">t1\nMA__G\n>t2\nO__\n")
  _fails(base[:4] + ["--template", str(tpl)], caplog, "--template record 't2' fixes O")
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert sample_cli.main(base + ["--motif", "XYZ@5", "--allow-rare", "--verbose"]) == 0
  for _, seq in read_records(tmp_path / "r.fasta"):
    assert seq[5:8] == "XYZ" and set(seq[:5] + seq[8:]) <= STANDARD | set("XBUZO")
  # --verbose shows the INFO lines of orbax (through absl); by default they are hidden.
  assert any(r.name == "absl" and r.levelno == logging.INFO for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.INFO):
    assert sample_cli.main(base + ["--motif", "WYW@5"]) == 0
  assert not [r for r in caplog.records if r.name in ("absl", "jax") or
              r.name.startswith(("absl.", "jax."))]
  assert any(r.name == "sedd_jax.sample" for r in caplog.records)


def test_help_describes_the_conditioning_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    sample_cli.main(["--help"])
  assert exit_info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())
  for phrase in ("--prefix SEQ fixed first residues", "--suffix SEQ fixed last residues",
                 "0-based position POS", "SEQ@? or SEQ alone draws the start",
                 "--seed SEED random seed", "--verbose"):
    assert phrase in text, phrase


def test_first_hitting_and_remask_flags(workdir, tmp_path, caplog):
  base = ["--workdir", str(workdir), "--num", "3", "--length", "12", "--batch-size", "3"]
  assert sample_cli.main(base + ["--predictor", "first_hitting", "--draw", "reference",
                                 "--remask", "0.5", "--prefix", "MK",
                                 "--reveal-order", "confidence",
                                 "--out", str(tmp_path / "f.fasta")]) == 0
  recs = read_records(tmp_path / "f.fasta")
  assert len(recs) == 3
  for head, seq in recs:
    assert len(seq) == 12 and seq.startswith("MK") and set(seq) <= STANDARD
    assert "predictor=first_hitting" in head and "draw=reference" in head
    assert "reveal_order=confidence" in head
  assert sample_cli.main(base + ["--steps", "4", "--remask", "0.2", "--temperature", "0.5",
                                 "--out", str(tmp_path / "r.fasta")]) == 0
  assert all("remask=0.2 temperature=0.5" in h for h, _ in read_records(tmp_path / "r.fasta"))
  out = ["--out", str(tmp_path / "x.fasta")]
  _fails(base + out + ["--predictor", "euler", "--remask", "0.1"], caplog,
         "--remask needs the analytic or first_hitting predictor")
  _fails(base + out + ["--remask", "1.5"], caplog, "--remask must be in [0, 1]")
  _fails(base + out + ["--temperature", "0"], caplog, "--temperature must be a finite number > 0")
  _fails(base + out + ["--reveal-order", "confidence"], caplog,
         "--reveal-order confidence needs the first_hitting predictor")
  _fails(base + out + ["--predictor", "first_hitting", "--cached"], caplog,
         "--predictor first_hitting needs the absorbing graph and no cache")


def _damaged_run(workdir, path, damaged: int = 5):
  """A run folder `path`: the checkpoint of `workdir` as step 0 and `damaged` newer copies with
  every array file of their EMA item cut to 5 bytes (as a torn copy leaves them)."""
  shutil.copytree(workdir / "checkpoints" / "0", path / "checkpoints" / "0")
  for step in range(1, damaged + 1):
    folder = path / "checkpoints" / str(step)
    shutil.copytree(path / "checkpoints" / "0", folder)
    for f in (folder / "ema").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.write_bytes(f.read_bytes()[:5])
  return path


def test_outputs_that_would_lose_something_are_refused_before_the_model_loads(
    workdir, tmp_path, caplog, monkeypatch):
  """An output that is an input (the same path, a symlink, a hard link), that lies in the run's
  checkpoints or data store, an existing folder, a file for a folder, an unwritable place, a
  negative seed: one line naming the flags, before the model is loaded; the inputs unchanged."""
  def no_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the outputs were checked")

  monkeypatch.setattr(ckpt_lib, "load_inference_checkpoint", no_load)
  tpl = tmp_path / "t.fasta"
  tpl.write_text(">t1\nMA__G\n")
  inf = tmp_path / "i.fasta"
  inf.write_text(">p1 spans=1:3\nMKVLA\n")
  lens = tmp_path / "lengths.txt"
  lens.write_text("5\n")
  (tmp_path / "link.fasta").symlink_to(tpl)
  os.link(inf, tmp_path / "hard.fasta")
  rep = tmp_path / "r.report.json"
  rep.write_text(">t1\nMA__G\n")
  w = ["--workdir", str(workdir)]
  ckpts = workdir / "checkpoints"
  store = sample_config(workdir.parent).data.prepared
  cases = [
      (["--template", str(tpl), "--out", str(tpl)],
       f"--out {tpl} would overwrite --template {tpl} (the same file)"),
      (["--template", str(tpl), "--out", str(tmp_path / "link.fasta")],
       f"--out {tmp_path / 'link.fasta'} would overwrite --template {tpl} (the same file)"),
      (["--infill", str(inf), "--out", str(tmp_path / "hard.fasta")],
       f"--out {tmp_path / 'hard.fasta'} would overwrite --infill {inf} (the same file)"),
      (["--lengths", str(lens), "--out", str(lens)],
       f"--out {lens} would overwrite --lengths {lens} (the same file)"),
      (["--template", str(rep), "--report", "--out", str(tmp_path / "r.fasta")],
       f"--report's JSON {rep} would overwrite --template {rep} (the same file)"),
      (["--out", str(ckpts / "0" / "x.fasta")],
       f"--out {ckpts / '0' / 'x.fasta'} lies inside the checkpoints of --workdir {ckpts}; "
       "writing there could corrupt it"),
      (["--out", f"{store}/x.fasta"], f"--out {store}/x.fasta lies inside the data store "
       f"(data.prepared) of the checkpoint {store}"),
      (["--out", str(tmp_path)], f"--out {tmp_path} is a folder; give a file path"),
      (["--out", str(tpl / "x.fasta")], f"--out {tpl / 'x.fasta'}: {tpl} is not a folder"),
      (["--out", str(tmp_path / "x.fasta"), "--seed", "-3"],
       "--seed must be an integer in [0, 2^32); got -3"),
  ]
  if sys.platform.startswith("linux"):  # /proc takes no new file, for root as well
    cases.append((["--out", "/proc/x.fasta"], "--out /proc/x.fasta: cannot write into /proc ("))
  for flags, match in cases:
    _fails(w + flags, caplog, match)
  assert tpl.read_text() == ">t1\nMA__G\n" and inf.read_text() == ">p1 spans=1:3\nMKVLA\n"
  assert lens.read_text() == "5\n" and rep.read_text() == ">t1\nMA__G\n"
  assert sorted(p.name for p in ckpts.iterdir()) == ["0"]
  # --checkpoint: its run's checkpoints are kept out of as well.
  _fails(["--checkpoint", str(ckpts / "0"), "--out", str(ckpts / "1" / "x.fasta")], caplog,
         f"lies inside the checkpoints of --checkpoint {ckpts}")


def test_damaged_newest_checkpoints_fall_back_quietly_and_are_recorded(workdir, tmp_path):
  """The CLI in a subprocess on a run whose five newest checkpoints have truncated EMA arrays:
  it samples from step 0 with one error line per damaged checkpoint and no "Exception ignored"
  traceback (the reads orbax abandoned); the headers record the checkpoint, its step, the run
  and the seed; the log names the seed and how to draw others; missing folders of --out are
  created."""
  run = _damaged_run(workdir, tmp_path / "run")
  out = tmp_path / "new" / "sub" / "s.fasta"
  p = subprocess.run([sys.executable, "-m", "sedd_jax.sample", "--workdir", str(run), "--num",
                      "2", "--length", "6", "--steps", "2", "--out", str(out)], cwd=ROOT,
                     env=subprocess_env(devices=1, fast=True), capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Exception ignored" not in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]
  errors = [line for line in p.stderr.splitlines() if " ERROR " in line]
  assert [e.split(" ERROR ")[1].split(" cannot be read: ")[0] for e in errors] == [
      f"checkpoint {run}/checkpoints/{s}" for s in range(5, 0, -1)]
  assert ("seed 0 (the same seed gives the same samples); pass --seed N for other "
          "samples") in p.stderr
  recs = read_records(out)
  assert len(recs) == 2
  for head, _ in recs:
    assert (" seed=0 " in head and f" weights=ema checkpoint={run}/checkpoints/0 step=0 "
            f"run={run} cond=none" in head), head
