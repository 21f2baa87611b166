"""The public Python API: a trained model as an object that samples, scores and embeds.

  import sedd_jax

  model = sedd_jax.load("runs/small")           # a run folder, a checkpoint folder or a bundle
  seqs = model.sample(8, length=120, seed=0)    # Samples: a list of str with .provenance
  seqs = model.sample(4, prefix="MKT", suffix="LLE", length=80)
  scores = model.score(seqs)                    # nelbo, nelbo_se, per_residue, ... (nats)
  effects = model.score_mutations(wild_type, ["A12G", "A12G:K40R"])
  emb = model.embed(seqs)                       # per_residue [(L_i, H)], mean (N, H)

- `load(path, *, weights="ema")` -> `SeddModel`, or `ProteinLigandModel` for a protein-ligand
  run (`cfg.task`); `weights`: "ema" (the EMA weights, what sampling and evaluation use) or
  "raw" (the optimiser's parameters), one of `WEIGHTS`.
- `SeddModel.sample / score / score_mutations / embed`; `ProteinLigandModel.sample_ligands /
  sample_proteins / sample_pairs / score_pairs`.
- `Samples`: the list that `sample*` return, with `.provenance`.
- `PairScores`: `score_pairs`' result.

Provenance: every result carries `.provenance`, a JSON-able dict: the source (path, kind run |
checkpoint | bundle, run folder, checkpoint folder, step, weights; for a bundle also what it was
exported from), the sedd_jax version, `call` (the method) and its settings (sampler options, seed,
batch size, lengths and conditions; the scorers' draws).

Keys: `sample` draws sequence i from its own key fold_in(key(seed), i)
(`sampler.sample_batched(..., key_per_sequence=True)`), so the samples of a seed do not depend
on `batch_size` (to the float rounding of the model on another batch shape; not with
`cached=True`, whose reuse decision is batch-wide: `sedd_jax.sampling.sampler`). Lengths or motif
positions that are drawn (`lengths="from-data"`, motifs without a position) come from
numpy's default_rng(seed), lengths first. The sampler's defaults are the run's
`cfg.sampling` (steps, predictor, eps), as the sample CLI's.

Errors: ValueError naming the argument (or FileNotFoundError naming the path); nothing is
cropped: a sequence, template or condition longer than the model's length is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Sequence

import numpy as np

from sedd_jax import bundle

logger = logging.getLogger(__name__)

WEIGHTS = ("ema", "raw")


class Samples(list):
  """A list of samples (str, or (protein, SMILES) tuples for `sample_pairs`) with
  `.provenance`, a dict of how they were drawn."""

  def __init__(self, items=(), provenance: dict | None = None):
    super().__init__(items)
    self.provenance = dict(provenance or {})


@dataclasses.dataclass(frozen=True)
class PairScores:
  """`ProteinLigandModel.score_pairs`: the negative ELBO of each ligand given its protein.

  nelbo: (N,) nats per pair (`likelihood.nelbo` of the ligand track, the protein clean).
  nelbo_se: (N,) its Monte-Carlo standard error.
  per_token: (N,) nelbo / length.
  length: (N,) SMILES tokens of each ligand.
  provenance: how they were computed.
  """

  nelbo: np.ndarray
  nelbo_se: np.ndarray
  per_token: np.ndarray
  length: np.ndarray
  provenance: dict = dataclasses.field(default_factory=dict)


def _with_provenance(result, provenance: dict):
  """`result` (a frozen dataclass with a `provenance` field) carrying `provenance`."""
  return dataclasses.replace(result, provenance=provenance)


def _check_int(name: str, value, low: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an integer; got {value!r}")
  if low is not None and value < low:
    raise ValueError(f"{name} must be >= {low}; got {value}")
  return int(value)


def _named(arg: str, error: ValueError, names: tuple[str, ...] = ()) -> ValueError:
  """`error` as a ValueError whose message names the argument: kept when it starts with `arg`
  or one of `names`, else prefixed with "`arg`: "."""
  msg = str(error)
  return ValueError(msg if msg.startswith((arg, *names)) else f"{arg}: {msg}")


def _strings(values, name: str) -> list[str]:
  """`values` as a list of str; ValueError naming `name` (one string is not a list of them)."""
  if isinstance(values, str) or not isinstance(values, Sequence):
    raise ValueError(f"{name} must be a list of strings; got {type(values).__name__}")
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise ValueError(f"{name}[{i}] must be a string; got {type(v).__name__}")
  if not values:
    raise ValueError(f"{name} is empty")
  return list(values)


# ---- loading ----------------------------------------------------------------------------------


def _load_checkpoint(path: pathlib.Path, weights: str):
  """(model, cfg, graph, noise, source) of the newest loadable checkpoint of a run folder (or
  the checkpoint folder `path`); `checkpoint.load_inference_checkpoint`'s errors as
  ValueError naming the path."""
  from sedd_jax.training import checkpoint as ckpt_lib  # noqa: PLC0415

  try:
    c = ckpt_lib.load_inference_checkpoint(path, use_ema=weights == "ema")
  except ckpt_lib.CheckpointError as e:  # other weights' shape, or no readable checkpoint
    raise ValueError(f"cannot load a model from {path}: {e}") from None
  loaded = "ema" if c.weights == "ema" else "raw"
  if loaded != weights:
    logger.warning("%s has no EMA weights; loaded its raw parameters", c.step_dir)
  source = {"path": str(path), "kind": "checkpoint" if c.step_dir == path else "run",
            "run": str(c.run_dir) if c.run_dir is not None else None,
            "checkpoint": str(c.step_dir), "step": c.step, "weights": loaded}
  return c.model, c.cfg, c.graph, c.noise, source


def load(path, *, weights: str = "ema"):
  """A trained model from a run folder (its newest loadable checkpoint), a checkpoint folder
  (`<run>/checkpoints/<step>`) or an exported bundle (`python -m sedd_jax.export`).

  Args:
    path: the folder.
    weights: "ema" (default: the EMA weights) or "raw" (the optimiser's parameters; a bundle
      holds the weights it was exported with).

  Returns:
    `SeddModel`, or `ProteinLigandModel` for a protein-ligand run (`cfg.task`).

  Raises:
    FileNotFoundError: `path` does not exist or holds no checkpoint.
    ValueError: a bad `weights`, a bundle of other weights, weights that do not fit the model
      of the config (naming the tensor or the arrays).
  """
  if weights not in WEIGHTS:
    raise ValueError(f"weights must be one of {WEIGHTS}; got {weights!r}")
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"path {path} does not exist")
  if bundle.is_bundle(path):
    meta = bundle.read_meta(path)
    held = meta["source"].get("weights")
    if held != weights:
      raise ValueError(f"weights={weights!r}: the bundle {path} holds the {held} weights "
                       f"(export it with --weights {weights} for those)")
    model, cfg, graph, noise, meta = bundle.load(path)
    source = {"path": str(path), "kind": "bundle", "run": meta["source"].get("run"),
              "checkpoint": meta["source"].get("checkpoint"), "step": meta["source"].get("step"),
              "weights": held, "exported_from": meta["source"],
              "bundle_sedd_jax_version": meta.get("sedd_jax_version")}
    stats, vocab = bundle.read_data_stats(path), meta["vocabulary"]
  else:
    model, cfg, graph, noise, source = _load_checkpoint(path, weights)
    stats, vocab = None, None
  if cfg.get("task", "sedd") == "protein_ligand":
    return ProteinLigandModel(model, cfg, graph, noise, source, stats, vocab)
  return SeddModel(model, cfg, graph, noise, source, stats)


# ---- the models ------------------------------------------------------------------------------


class _LoadedModel:
  """What both kinds of model share: the network, its config, diffusion, source and data."""

  def __init__(self, model, cfg, graph, noise, source: dict,
               stats: bundle.DataStats | None = None):
    self.model, self.cfg, self.graph, self.noise = model, cfg, graph, noise
    self.source = dict(source)
    self._stats = stats
    self._stats_read = stats is not None or source.get("kind") == "bundle"

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.source['path']!r}, step={self.step}, "
            f"weights={self.weights!r}, length={self.max_length})")

  @property
  def max_length(self) -> int:
    """The model's (protein) length, cfg.model.length: the longest sequence it takes."""
    return int(self.cfg.model.length)

  @property
  def step(self) -> int | None:
    """The training step of the checkpoint the weights come from."""
    return self.source.get("step")

  @property
  def weights(self) -> str:
    """"ema" or "raw"."""
    return self.source["weights"]

  def data_stats(self) -> bundle.DataStats | None:
    """The training data's length histograms and composition: a bundle's data_stats.json, or
    for a run read (once) from the store of cfg.data.prepared; None when neither exists."""
    if not self._stats_read:
      self._stats = bundle.data_stats(self.cfg)
      self._stats_read = True
    return self._stats

  def provenance(self, call: str, **settings) -> dict:
    """The provenance dict of a result of the method `call` with its `settings`."""
    return {"source": dict(self.source), "sedd_jax_version": bundle.version(), "call": call,
            **settings}

  def _drawn_lengths(self, track: str, arg: str, instead: str, num: int, rng, top: int
                     ) -> np.ndarray:
    """(num,) lengths of `track` drawn from the training data's histogram, capped at `top`;
    without the data a ValueError naming `arg` and saying to give `instead`."""
    stats = self.data_stats()
    if stats is None or track not in stats.tracks:
      raise ValueError(f"{arg}: drawing the {track} lengths needs the training data's lengths: "
                       f"no prepared data at {self.cfg.data.prepared} (cfg.data.prepared) and "
                       f"no data_stats.json in {self.source['path']}; give {instead}")
    return stats.tracks[track].draw_lengths(num, rng, top)


class SeddModel(_LoadedModel):
  """A trained protein SEDD model (`load`): the DDiT with its config, graph and noise.

  Attributes:
    model: the `sedd_jax.model.DDiT` (eval mode).
    cfg: its config (ConfigDict).
    graph, noise: the diffusion it was trained with.
    tokenizer: the `ProteinTokenizer` (ESM-2 ids).
    source: where it was loaded from (`provenance()["source"]`).
    compiler_options: XLA options of the compiled samplers (None: XLA's defaults; e.g.
      {"xla_backend_optimization_level": 0} compiles 2-3x faster on the CPU, as the tests do).
  The compiled sampler of each batch shape and option set is kept for later `sample` calls.
  """

  def __init__(self, model, cfg, graph, noise, source: dict,
               stats: bundle.DataStats | None = None):
    from sedd_jax.data import tokenizers  # noqa: PLC0415

    super().__init__(model, cfg, graph, noise, source, stats)
    self.tokenizer = tokenizers.ProteinTokenizer()
    self.compiler_options: dict | None = None
    self._compiled: dict = {}  # the compiled samplers of this model, by shape and options

  # -- sampling --

  def sample(self, num: int | None = None, *, length: int | None = None,
             lengths: Sequence[int] | str | None = None, prefix: str | None = None,
             suffix: str | None = None, motifs: Sequence[str | tuple[str, int | None]] = (),
             template: str | Sequence[str] | None = None, infill=None, mask_char: str = "_",
             allow_rare: bool = False, predictor: str | None = None, steps: int | None = None,
             eps: float | None = None, temperature: float = 1.0, remask: float = 0.0,
             draw: str = "unbiased", reveal_order: str = "random", cached: bool = False,
             seed: int = 0, batch_size: int = 64, progress: bool = False) -> Samples:
    """Draws protein sequences by the reverse process, optionally conditioned.

    Args:
      num: sequences to draw (per template / infill record); default len(lengths) for a list
        of lengths, else 1.
      length: the length of every sequence (default: the model's), or
      lengths: one length per sequence, or "from-data" (num lengths drawn from the training
        data's length histogram, capped at the model's length).
      prefix, suffix: residues fixed at the start / end of each sequence.
      motifs: segments fixed inside the sequence: "SEQ@POS" (0-based start), "SEQ" / "SEQ@?"
        (start drawn among the free ones) or (SEQ, POS or None) pairs. Combinable with
        prefix / suffix.
      template: a template string ('<mask>' or `mask_char` = generate, a residue = fixed), or
        a list of them (num samples of each; sets the lengths).
      infill: (sequence, spans) with spans "10:20,40:45" or [(10, 20), ...] (0-based,
        half-open) to regenerate, or a list of such pairs (num samples of each).
      mask_char: the template's free-position character.
      allow_rare: also generate (and accept fixed) X B U Z O.
      predictor, steps, eps: the sampler (default the run's cfg.sampling: analytic, 128
        steps for the released configs).
      temperature, remask, draw, reveal_order, cached: as `sedd_jax.sampling.sampler.sample`.
      seed: the sampler's seed (sequence i uses fold_in(key(seed), i)) and that of drawn
        lengths / motif positions.
      batch_size: sequences per compiled call (the samples do not depend on it).
      progress: log each batch with its speed.

    Returns:
      Samples (a list of str) with `.provenance`: source, sampler settings, seed, batch size,
      lengths and the condition of each sequence (fixed letters, '_' free; None without).
    """
    import jax  # noqa: PLC0415

    from sedd_jax.data import tokenizers  # noqa: PLC0415
    from sedd_jax.sampling import conditioning as cond  # noqa: PLC0415
    from sedd_jax.sampling import sampler  # noqa: PLC0415

    seed = _check_int("seed", seed)
    batch_size = _check_int("batch_size", batch_size, 1)
    steps, predictor, eps = sampler.resolve_options(
        self.graph, self.cfg.sampling, steps=steps, predictor=predictor, eps=eps, cached=cached,
        draw=draw, remask=remask, temperature=temperature, reveal_order=reveal_order)
    plan_lengths, conds = self._plan(num, length, lengths, prefix, suffix, motifs, template,
                                     infill, mask_char, allow_rare, seed)
    n, run_len = len(plan_lengths), int(plan_lengths.max())
    fixed_tokens = fixed_mask = None
    if any(c is not None for c in conds):
      empty = cond.Condition(np.zeros((0,), np.int32), np.zeros((0,), bool))
      fixed_tokens, fixed_mask = cond.stack([c or empty for c in conds], run_len)
    tokens = sampler.sample_batched(
        jax.random.key(seed), self.graph, self.noise, n, run_len, batch_size=batch_size,
        steps=steps, predictor=predictor, eps=eps, model=self.model, fixed_tokens=fixed_tokens,
        fixed_mask=fixed_mask, lengths=plan_lengths, cached=cached,
        allowed=tokenizers.residue_mask(self.graph.dim, allow_rare=allow_rare), draw=draw,
        remask=remask, temperature=temperature, reveal_order=reveal_order, progress=progress,
        key_per_sequence=True, cache=self._compiled, compiler_options=self.compiler_options)
    seqs = [self.tokenizer.decode(tokens[i, :plan_lengths[i]]) for i in range(n)]
    return Samples(seqs, self.provenance(
        "sample", sampler={"predictor": predictor, "steps": steps, "eps": eps,
                           "temperature": temperature, "remask": remask, "draw": draw,
                           "reveal_order": reveal_order, "cached": cached,
                           "allow_rare": allow_rare},
        seed=seed, keys="fold_in(key(seed), i) per sequence", batch_size=batch_size, num=n,
        lengths=plan_lengths.tolist(),
        conditions=[c.describe() if c is not None else None for c in conds]))

  def _plan(self, num, length, lengths, prefix, suffix, motifs, template, infill, mask_char,
            allow_rare, seed) -> tuple[np.ndarray, list]:
    """(lengths (N,) int32, N conditions or None) of `sample`'s arguments."""
    from sedd_jax.sampling import conditioning as cond  # noqa: PLC0415

    given = {"template": template is not None, "infill": infill is not None,
             "prefix/suffix/motifs": bool(prefix or suffix or motifs)}
    if sum(given.values()) > 1:
      raise ValueError("template, infill and prefix/suffix/motifs exclude each other; got "
                       + " and ".join(k for k, v in given.items() if v))
    if length is not None and lengths is not None:
      raise ValueError("give length or lengths, not both")
    if num is not None:
      num = _check_int("num", num, 1)
    for name, value in (("prefix", prefix), ("suffix", suffix)):
      if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a residue string; got {type(value).__name__}")
    if isinstance(motifs, str) or not isinstance(motifs, Sequence):
      raise ValueError(f"motifs must be a list of 'SEQ@POS' strings or (SEQ, POS) pairs; got "
                       f"{motifs!r}")
    if template is not None or infill is not None:
      mode = "template" if template is not None else "infill"
      if length is not None or lengths is not None:
        raise ValueError(f"{mode} sets the lengths; drop length/lengths")
      conds = self._records(mode, template if template is not None else infill, mask_char,
                            allow_rare)
      conds = [c for c in conds for _ in range(1 if num is None else num)]
      return np.array([c.length for c in conds], np.int32), conds
    rng = np.random.default_rng(seed)
    plan = self._lengths(num, length, lengths, rng)
    conds = []
    for n in plan:
      try:
        conds.append(cond.inline(int(n), prefix=prefix, suffix=suffix, motifs=motifs, rng=rng,
                                 max_length=self.max_length, allow_rare=allow_rare))
      except ValueError as e:
        raise _named("prefix/suffix/motifs", e, ("prefix", "suffix", "motif")) from None
    return plan, conds

  def _lengths(self, num, length, lengths, rng) -> np.ndarray:
    """(N,) int32 lengths of `sample`'s length / lengths (checked against the model)."""
    from sedd_jax.sampling import conditioning as cond  # noqa: PLC0415

    if isinstance(lengths, str):
      if lengths != "from-data":
        raise ValueError(f"lengths must be a list of integers or 'from-data'; got {lengths!r}")
      return self._drawn_lengths("protein", "lengths='from-data'", "length or a list of lengths",
                                 1 if num is None else num, rng, self.max_length)
    if lengths is not None:
      if not isinstance(lengths, (Sequence, np.ndarray)) or not len(lengths):
        raise ValueError(f"lengths must be a non-empty list of integers; got {lengths!r}")
      out = [_check_int(f"lengths[{i}]", n) for i, n in enumerate(lengths)]
      if num is not None and num != len(out):
        raise ValueError(f"num {num} differs from the {len(out)} lengths given")
      names = [f"lengths[{i}]" for i in range(len(out))]
    else:
      n = self.max_length if length is None else _check_int("length", length)
      out, names = [n] * (1 if num is None else num), ["length"] * (1 if num is None else num)
    for n, name in zip(out, names):
      cond.check_length(n, self.max_length, name)
    return np.asarray(out, np.int32)

  def _records(self, mode: str, value, mask_char: str, allow_rare: bool) -> list:
    """The Conditions of the template strings / infill (sequence, spans) pairs `value`."""
    from sedd_jax.sampling import conditioning as cond  # noqa: PLC0415

    single = isinstance(value, str) if mode == "template" else (
        isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str))
    records = [value] if single else list(value) if isinstance(value, Sequence) else None
    if not records:
      raise ValueError(f"{mode} must be " + ("a template string or a list of them" if
                                             mode == "template" else
                                             "a (sequence, spans) pair or a list of them")
                       + f"; got {value!r}")
    out = []
    for i, rec in enumerate(records):
      name = mode if single else f"{mode}[{i}]"
      try:
        if mode == "template":
          if not isinstance(rec, str):
            raise ValueError(f"must be a string; got {type(rec).__name__}")
          c = cond.template(rec, mask_char, self.max_length)
        else:
          if not (isinstance(rec, (tuple, list)) and len(rec) == 2 and isinstance(rec[0], str)):
            raise ValueError(f"must be a (sequence, spans) pair; got {rec!r}")
          seq, spans = rec
          spans = cond.parse_spans(spans) if isinstance(spans, str) else [
              (int(a), int(b)) for a, b in spans]
          c = cond.infill(seq, spans, self.max_length)
        cond.check_residues(c, allow_rare, name)
      except ValueError as e:
        raise _named(name, e) from None
      out.append(c)
    return out

  # -- scoring and embedding (sedd_jax.sampling.likelihood / mutations / embedding) --

  def score(self, seqs: Sequence[str], *, num_samples: int = 16, seed: int = 0,
            batch_size: int = 64, t_sampling: str = "antithetic", t_min: float = 0.0,
            pack: bool = True):
    """The negative ELBO of each sequence (nats; an upper bound on -log p), the `evaluate`
    estimator on packed rows (`likelihood.score_sequences`; its numbers for a sequence do not
    depend on batch_size or the other sequences).

    Args:
      seqs: residue strings (or id arrays), each at most the model's length (longer ones are
        refused: crop or window them yourself).
      num_samples: draws of t per sequence (even for antithetic).
      seed: the draws' seed.
      batch_size: rows per compiled call.
      t_sampling, t_min, pack: the draws of t ("iid" | "stratified" | "antithetic"), the lower
        end of the t integral, several sequences per row (`likelihood.score_sequences`).

    Returns:
      `likelihood.SequenceScores` (frozen): (N,) numpy arrays nelbo, nelbo_se, per_residue,
      per_residue_se, length (and prior, total_se), with `.provenance`.
    """
    from sedd_jax.sampling import likelihood  # noqa: PLC0415

    result = likelihood.score_sequences(
        self.model, self.graph, self.noise, seqs, max_length=self.max_length,
        num_samples=_check_int("num_samples", num_samples, 1), seed=_check_int("seed", seed),
        batch_size=_check_int("batch_size", batch_size, 1), t_sampling=t_sampling, t_min=t_min,
        pack=pack)
    return _with_provenance(result, self.provenance(
        "score", num_samples=num_samples, seed=seed, batch_size=batch_size,
        t_sampling=t_sampling, t_min=t_min, pack=pack, num=len(result.nelbo)))

  def score_mutations(self, wild_type: str, mutations: Sequence[str], *, method: str = "elbo",
                      num_samples: int = 16, seed: int = 0, batch_size: int = 64,
                      t_sampling: str = "antithetic", pack: bool = True):
    """log p(variant) - log p(wild type) of each mutation, nats (higher = fitter;
    `mutations.score_mutations`).

    Args:
      wild_type: the wild-type residues (at most the model's length).
      mutations: "A12G" (1-based) or "A12G:K40R" strings.
      method: "elbo" (difference of negative ELBOs with common random numbers) or
        "masked_marginal" (absorbing graph).
      num_samples, seed, batch_size, t_sampling, pack: the draws (elbo), rows per call, several
        sequences per row (`mutations.score_mutations`).

    Returns:
      `mutations.MutationScores` (frozen): mutations (list of str), (M,) arrays delta and se,
      with `.provenance`.
    """
    from sedd_jax.sampling import mutations as mutations_lib  # noqa: PLC0415

    result = mutations_lib.score_mutations(
        self.model, self.graph, self.noise, wild_type, mutations, max_length=self.max_length,
        num_samples=_check_int("num_samples", num_samples, 1), seed=_check_int("seed", seed),
        batch_size=_check_int("batch_size", batch_size, 1), method=method,
        t_sampling=t_sampling, pack=pack)
    return _with_provenance(result, self.provenance(
        "score_mutations", method=method, num_samples=num_samples, seed=seed,
        batch_size=batch_size, t_sampling=t_sampling, pack=pack, num=len(result.delta)))

  def embed(self, seqs: Sequence[str], *, layer: int = -1, t: float = 0.0, seed: int = 0,
            batch_size: int = 64, pack: bool = True):
    """Per-residue hidden states of the DDiT (`embedding.embed`).

    Args:
      seqs: residue strings (or id arrays), each at most the model's length.
      layer: which residual-stream state, indexed like a list of the n_blocks + 1 states (0: the
        token embedding, k: after block k, -1: after the last block, before the output layer).
      t: diffusion time of the input (0: nothing masked; t > 0 masks tokens drawn from seed).
      seed, batch_size, pack: the masking draws (t > 0), rows per call, several sequences per
        row.

    Returns:
      `embedding.Embeddings` (frozen): per_residue (list of (L_i, H) arrays), mean ((N, H)),
      with `.provenance`.
    """
    from sedd_jax.sampling import embedding  # noqa: PLC0415

    result = embedding.embed(
        self.model, self.graph, self.noise, seqs, max_length=self.max_length,
        layer=_check_int("layer", layer), t=t, seed=_check_int("seed", seed),
        batch_size=_check_int("batch_size", batch_size, 1), pack=pack)
    return _with_provenance(result, self.provenance(
        "embed", layer=layer, t=t, seed=seed, batch_size=batch_size, pack=pack,
        num=len(result.mean)))


# ---- the protein-ligand model -----------------------------------------------------------------


def _chunks(n: int, batch_size: int):
  """(index (batch_size,), number of real entries) of consecutive chunks of n items, the last
  filled up by repeating its last item (one compiled shape)."""
  for lo in range(0, n, batch_size):
    hi = min(n, lo + batch_size)
    yield np.resize(np.arange(lo, hi), batch_size), hi - lo


class ProteinLigandModel(_LoadedModel):
  """A trained protein-ligand model (`load` of a run with cfg.task = "protein_ligand"): the
  dual-track DDiT (`sedd_jax.protein_ligand`), its config, graphs and noise.

  Attributes:
    model: the `ProteinLigandDDiT` (eval mode).
    cfg: its config.
    graph, ligand_graph: the protein and ligand graphs; noise: the shared schedule.
    tokenizer, smiles_tokenizer: the ESM-2 and SMILES tokenizers.
  Every `sample_*` draws sample i from fold_in(key(seed), i) (not dependent on batch_size);
  lengths not given are drawn from the training data's histograms by default_rng(seed).
  """

  def __init__(self, model, cfg, graph, noise, source: dict,
               stats: bundle.DataStats | None = None, vocab: dict | None = None):
    from sedd_jax.data import reference  # noqa: PLC0415
    from sedd_jax.data import tokenizers  # noqa: PLC0415
    from sedd_jax.protein_ligand import model as pl_model  # noqa: PLC0415

    super().__init__(model, cfg, graph, noise, source, stats)
    self.tokenizer = tokenizers.ProteinTokenizer()
    if vocab is not None:  # a bundle's: specials first, <mask> last
      specials = len(tokenizers.SMILES_SPECIALS)
      self.smiles_tokenizer = tokenizers.SmilesTokenizer(vocab["ligand"][specials:-1])
    else:
      self.smiles_tokenizer = reference.reference_pairs(cfg, "train")[1]
    self.graph, self.ligand_graph = pl_model.get_graphs(cfg)

  @property
  def ligand_length(self) -> int:
    """The ligand track's length, cfg.ligand.length (SMILES tokens)."""
    return int(self.cfg.ligand.length)

  def _encode(self, values, name: str, ligand: bool) -> list[np.ndarray]:
    """Proteins (residue strings) or ligands (SMILES) -> id arrays; ValueError naming
    `name[i]` for a bad token or one longer than the track's length (never cropped)."""
    top = self.ligand_length if ligand else self.max_length
    out = []
    for i, text in enumerate(_strings(values, name)):
      try:
        ids = (self.smiles_tokenizer.encode(text) if ligand else self.tokenizer.encode(text))
      except ValueError as e:
        raise ValueError(f"{name}[{i}]: {e}") from None
      if not 1 <= ids.size <= top:
        raise ValueError(f"{name}[{i}] has {ids.size} tokens; the model takes 1..{top} "
                         f"({'cfg.ligand.length' if ligand else 'cfg.model.length'})")
      out.append(ids)
    return out

  def _target_lengths(self, value, name: str, track: str, num: int, rng, top: int
                      ) -> np.ndarray:
    """(num,) int32: `value` for all, one per sample (a sequence of `num`), or drawn from the
    training data's histogram of `track`; ValueError naming `name` (or `name[i]`)."""
    if value is None:
      return self._drawn_lengths(track, name, name, num, rng, top)
    if isinstance(value, (Sequence, np.ndarray)):
      if len(value) != num:
        raise ValueError(f"{name} must give one length per sample ({num}); got {len(value)}")
      out = [_check_int(f"{name}[{i}]", v, 1) for i, v in enumerate(value)]
      for i, v in enumerate(out):
        if v > top:
          raise ValueError(f"{name}[{i}] {v} must lie in [1, {top}]")
      return np.asarray(out, np.int32)
    value = _check_int(name, value, 1)
    if value > top:
      raise ValueError(f"{name} {value} must lie in [1, {top}]")
    return np.full((num,), value, np.int32)

  def _sampler_settings(self, graph, predictor, steps, eps, temperature, reveal_order) -> dict:
    from sedd_jax.sampling import sampler  # noqa: PLC0415

    steps, predictor, eps = sampler.resolve_options(
        graph, self.cfg.sampling, steps=steps, predictor=predictor, eps=eps,
        temperature=temperature, reveal_order=reveal_order)
    return {"predictor": predictor, "steps": steps, "eps": eps, "temperature": temperature,
            "reveal_order": reveal_order}

  def _conditional(self, task: str, given: list[np.ndarray], each: int, targets: np.ndarray,
                   settings: dict, guidance: float, seed: int, batch_size: int) -> np.ndarray:
    """(N, width) tokens of `task` for `given` id arrays, `each` samples of each in order."""
    import jax  # noqa: PLC0415

    from sedd_jax.data import reference  # noqa: PLC0415
    from sedd_jax.protein_ligand import conditional  # noqa: PLC0415
    from sedd_jax.sampling import sampler  # noqa: PLC0415

    width = self.max_length if task == "ligand_given_protein" else self.ligand_length
    given_tokens, given_lengths = reference.pad_tokens([g for g in given for _ in range(each)],
                                                       width)
    n, key, out = len(given_lengths), jax.random.key(seed), []
    for idx, real in _chunks(n, min(batch_size, n)):
      x = conditional.sample_conditional(
          sampler.row_keyed(sampler.sequence_keys(key, idx)), self.model, self.cfg, task,
          given_tokens[idx], given_lengths[idx], targets[idx], guidance=guidance, **settings)
      out.append(np.asarray(jax.device_get(x))[:real])
    return np.concatenate(out)

  def sample_ligands(self, proteins: Sequence[str], *, num_per_protein: int = 1,
                     ligand_length: int | Sequence[int] | None = None, guidance: float = 1.0,
                     temperature: float = 1.0, predictor: str | None = None,
                     steps: int | None = None, eps: float | None = None,
                     reveal_order: str = "random", seed: int = 0,
                     batch_size: int = 64) -> Samples:
    """SMILES for each protein (the ligand track given the clean protein;
    `protein_ligand.conditional.sample_conditional`).

    Args:
      proteins: residue strings, each at most the model's length (never cropped).
      num_per_protein: ligands per protein (protein 0's first).
      ligand_length: SMILES tokens of every ligand, or one per sample (a sequence of
        len(proteins) * num_per_protein, in the order of the samples); default: drawn from the
        training ligands' length histogram.
      guidance: classifier-free guidance weight W (1: none; W != 1 needs a config that trained
        both scores).
      temperature, predictor, steps, eps, reveal_order: the sampler (default cfg.sampling).
      seed, batch_size: as `SeddModel.sample`.

    Returns:
      Samples of SMILES strings (validity is not checked: `protein_ligand.smiles`), with
      `.provenance` (including `given`: the protein index of each sample).
    """
    seed = _check_int("seed", seed)
    batch_size = _check_int("batch_size", batch_size, 1)
    each = _check_int("num_per_protein", num_per_protein, 1)
    given = self._encode(proteins, "proteins", ligand=False)
    settings = self._sampler_settings(self.ligand_graph, predictor, steps, eps, temperature,
                                      reveal_order)
    n = len(given) * each
    targets = self._target_lengths(ligand_length, "ligand_length", "ligand", n,
                                   np.random.default_rng(seed), self.ligand_length)
    tokens = self._conditional("ligand_given_protein", given, each, targets, settings,
                               guidance, seed, batch_size)
    smiles = [self.smiles_tokenizer.decode(tokens[i, :targets[i]]) for i in range(n)]
    return Samples(smiles, self.provenance(
        "sample_ligands", sampler=settings, guidance=guidance, seed=seed,
        keys="fold_in(key(seed), i) per sample", batch_size=batch_size, num=n,
        ligand_lengths=targets.tolist(), given=np.repeat(np.arange(len(given)), each).tolist()))

  def sample_proteins(self, smiles: Sequence[str], *, num_per_ligand: int = 1,
                      length: int | Sequence[int] | None = None, guidance: float = 1.0,
                      temperature: float = 1.0, predictor: str | None = None,
                      steps: int | None = None, eps: float | None = None,
                      reveal_order: str = "random", seed: int = 0,
                      batch_size: int = 64) -> Samples:
    """Protein sequences for each ligand (the protein track given the clean SMILES; the 20
    standard residues). `length`: residues of every protein, or one per sample (default: drawn
    from the training proteins' length histogram, capped at the model's length); the rest as
    `sample_ligands`.

    Returns:
      Samples of residue strings with `.provenance` (`given`: the ligand index of each).
    """
    seed = _check_int("seed", seed)
    batch_size = _check_int("batch_size", batch_size, 1)
    each = _check_int("num_per_ligand", num_per_ligand, 1)
    given = self._encode(smiles, "smiles", ligand=True)
    settings = self._sampler_settings(self.graph, predictor, steps, eps, temperature,
                                      reveal_order)
    n = len(given) * each
    targets = self._target_lengths(length, "length", "protein", n, np.random.default_rng(seed),
                                   self.max_length)
    tokens = self._conditional("protein_given_ligand", given, each, targets, settings,
                               guidance, seed, batch_size)
    seqs = [self.tokenizer.decode(tokens[i, :targets[i]]) for i in range(n)]
    return Samples(seqs, self.provenance(
        "sample_proteins", sampler=settings, guidance=guidance, seed=seed,
        keys="fold_in(key(seed), i) per sample", batch_size=batch_size, num=n,
        lengths=targets.tolist(), given=np.repeat(np.arange(len(given)), each).tolist()))

  def sample_pairs(self, num: int, *, length: int | Sequence[int] | None = None,
                   ligand_length: int | Sequence[int] | None = None, temperature: float = 1.0,
                   predictor: str | None = None, steps: int | None = None,
                   eps: float | None = None, reveal_order: str = "random", seed: int = 0,
                   batch_size: int = 64) -> Samples:
    """`num` protein-ligand pairs from noise, both tracks denoised together
    (`protein_ligand.joint.sample_joint`). Lengths not given are drawn from the training
    data's protein and ligand histograms (independently: the bundle keeps no joint
    histogram); `length` / `ligand_length` may also give one length per pair (a sequence of
    `num`).

    Returns:
      Samples of (protein, SMILES) tuples with `.provenance`.
    """
    import jax  # noqa: PLC0415

    from sedd_jax.protein_ligand import joint  # noqa: PLC0415
    from sedd_jax.sampling import sampler  # noqa: PLC0415

    num = _check_int("num", num, 1)
    seed = _check_int("seed", seed)
    batch_size = min(_check_int("batch_size", batch_size, 1), num)
    settings = self._sampler_settings(joint.combined_graph(self.graph, self.ligand_graph),
                                      predictor, steps, eps, temperature, reveal_order)
    rng = np.random.default_rng(seed)
    plens = self._target_lengths(length, "length", "protein", num, rng, self.max_length)
    llens = self._target_lengths(ligand_length, "ligand_length", "ligand", num, rng,
                                 self.ligand_length)
    key, prots, ligs = jax.random.key(seed), [], []
    for idx, real in _chunks(num, batch_size):
      p, lig = joint.sample_joint(sampler.row_keyed(sampler.sequence_keys(key, idx)), self.model,
                                  self.cfg, plens[idx], llens[idx], **settings)
      prots.append(np.asarray(jax.device_get(p))[:real])
      ligs.append(np.asarray(jax.device_get(lig))[:real])
    prots, ligs = np.concatenate(prots), np.concatenate(ligs)
    pairs = [(self.tokenizer.decode(prots[i, :plens[i]]),
              self.smiles_tokenizer.decode(ligs[i, :llens[i]])) for i in range(num)]
    return Samples(pairs, self.provenance(
        "sample_pairs", sampler=settings, seed=seed, keys="fold_in(key(seed), i) per sample",
        batch_size=batch_size, num=num, lengths=plens.tolist(), ligand_lengths=llens.tolist()))

  def score_pairs(self, proteins: Sequence[str], smiles: Sequence[str], *,
                  num_samples: int = 16, seed: int = 0, batch_size: int = 64) -> PairScores:
    """The negative ELBO of each ligand given its protein (nats; `likelihood.nelbo` of the
    ligand track with the protein clean, the ligand_given_protein mode's estimator), antithetic
    draws of t; batch b of `batch_size` pairs draws from fold_in(key(seed), b).

    Args:
      proteins, smiles: the pairs, protein i with ligand i (each within its track's length).
      num_samples: draws of t per pair (even).
      seed, batch_size: the draws and pairs per compiled call.

    Returns:
      `PairScores` (frozen): (N,) nelbo, nelbo_se, per_token, length, and provenance.
    """
    import jax  # noqa: PLC0415

    from sedd_jax.data import reference  # noqa: PLC0415

    prots = self._encode(proteins, "proteins", ligand=False)
    ligs = self._encode(smiles, "smiles", ligand=True)
    if len(prots) != len(ligs):
      raise ValueError(f"proteins and smiles must pair up: {len(prots)} proteins, "
                       f"{len(ligs)} SMILES")
    num_samples = _check_int("num_samples", num_samples, 2)
    if num_samples % 2:
      raise ValueError(f"num_samples must be even (antithetic pairs); got {num_samples}")
    seed = _check_int("seed", seed)
    batch_size = min(_check_int("batch_size", batch_size, 1), len(prots))
    p_tok, p_len = reference.pad_tokens(prots, self.max_length)
    l_tok, l_len = reference.pad_tokens(ligs, self.ligand_length)
    out = {k: [] for k in ("nelbo", "se", "tokens")}
    for b, (idx, real) in enumerate(_chunks(len(prots), batch_size)):
      r = jax.device_get(_pair_nelbo()(
          self.model, jax.random.fold_in(jax.random.key(seed), b), p_tok[idx], p_len[idx],
          l_tok[idx], l_len[idx], num_samples=num_samples, graph=self.ligand_graph,
          noise=self.noise))
      for k in out:
        out[k].append(np.asarray(getattr(r, k), np.float64)[:real])
    nelbo, se, tokens = (np.concatenate(out[k]) for k in ("nelbo", "se", "tokens"))
    return PairScores(nelbo=nelbo, nelbo_se=se, per_token=nelbo / tokens,
                      length=tokens.astype(np.int64), provenance=self.provenance(
                          "score_pairs", num_samples=num_samples, seed=seed,
                          t_sampling="antithetic", batch_size=batch_size, num=len(prots)))


@functools.lru_cache(maxsize=None)
def _pair_nelbo():
  """`_pair_nelbo_fn` under `nnx.jit` (built once: its compiled programs are kept per shape)."""
  from flax import nnx  # noqa: PLC0415
  return nnx.jit(_pair_nelbo_fn, static_argnames=("num_samples", "graph", "noise"))


def _pair_nelbo_fn(model, key, protein, protein_lengths, ligand, ligand_lengths, *,
                   num_samples: int, graph, noise):
  """`likelihood.nelbo` (B,) of the ligands (B, Ll) given the clean proteins (B, Lp)."""
  import jax.numpy as jnp  # noqa: PLC0415

  from sedd_jax.sampling import likelihood  # noqa: PLC0415

  zeros = jnp.zeros((protein.shape[0],), jnp.float32)

  def log_score_fn(x, sigma, lengths=None):
    _, out = model(protein, x, zeros, sigma, protein_lengths, lengths, heads=("ligand",))
    return out.astype(jnp.float32)

  return likelihood.nelbo(key, log_score_fn, graph, noise, ligand, lengths=ligand_lengths,
                          num_samples=num_samples, t_sampling="antithetic")
