"""Periodic samples during training, one writer per task (`SAMPLE_WRITERS[task.name]`)."""

from __future__ import annotations

import logging
import pathlib
import time

from sedd_jax.training import runtime

logger = logging.getLogger("sedd_jax.train")


# `SAMPLE_WRITERS[task.name](built, compiler_options, cache, metrics_writer, workdir, primary)`
# (cache: `run.CompileCache`) returns `write(state, validation batches,
# key, step)`, which samples with the EMA weights and writes `<workdir>/samples/step_<step>.*`.
# Every process runs the sampler on the same global inputs (a collective); process 0 writes.


def _protein_sample_writer(built, options, cache, writer, workdir, primary):
  """SEDD: `num_samples` proteins, lengths from the validation batches -> step_<n>.fasta."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from sedd_jax.data import tokenizers  # noqa: PLC0415
  from sedd_jax.sampling import sampler as sampler_lib  # noqa: PLC0415
  cfg, graph, noise = built.cfg, built.task.graph, built.task.noise
  n, L = int(cfg.training.num_samples), int(cfg.model.length)
  allowed = jnp.asarray(tokenizers.residue_mask(graph.dim))

  def run(ema, rest, key, lengths):
    model = nnx.merge(built.defs.eval, ema, rest)
    return sampler_lib.sample(key, sampler_lib.model_score_fn(model), graph, noise, (n, L),
                              steps=int(cfg.sampling.steps), predictor=str(cfg.sampling.predictor),
                              eps=float(cfg.sampling.eps), lengths=lengths, allowed=allowed)

  replicated = jax.sharding.NamedSharding(built.mesh, jax.sharding.PartitionSpec())
  sample_fn = cache.get("sample", cfg, built.mesh, options,
                      lambda: jax.jit(run, out_shardings=replicated,
                                      compiler_options=options or None))

  def write(state, batches, key, step):
    if batches:
      pool = np.concatenate([b["lengths"] for b in batches])
      lengths = np.resize(pool, n).astype(np.int32)
    else:
      lengths = np.full((n,), L, np.int32)
    t0 = time.perf_counter()
    tokens = np.asarray(jax.device_get(sample_fn(state.ema, built.rest, key, lengths)))
    if not primary:
      return
    tok = tokenizers.ProteinTokenizer()
    out = pathlib.Path(workdir) / "samples" / f"step_{step}.fasta"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
      seq = tok.decode(tokens[i, :lengths[i]])
      lines.append(f">sample_{i} step={step} length={len(seq)}\n{seq}\n")
    out.write_text("".join(lines))
    logger.info("step %d: %d samples (%.1f s) -> %s; first: %s", step, n,
                time.perf_counter() - t0, out, lines[0].split("\n")[1][:60] if lines else "")

  return write


def _ligand_sample_writer(built, options, cache, writer, workdir, primary):
  """Protein-ligand: ligands given the first `num_samples` validation proteins (target lengths
  = their reference ligands') -> step_<n>.smi (`SMILES<TAB>name`), SMILES validity logged as a
  `sample` row (`smiles_validity`, checked by RDKit if installed, else by grammar)."""
  import numpy as np  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from sedd_jax.data import pipeline  # noqa: PLC0415
  from sedd_jax.data import store as store_lib  # noqa: PLC0415
  from sedd_jax.protein_ligand import modes  # noqa: PLC0415

  del options, cache  # sample_ligand_given_protein is compiled (and cached) by nnx.jit
  cfg, n = built.cfg, int(built.cfg.training.num_samples)
  smiles_tok = store_lib.Store(pipeline.resolve_path(cfg.data.prepared), "train").smiles_tokenizer()
  checker, is_valid = modes.validity_checker()

  def write(state, batches, key, step):
    if not batches:
      logger.warning("step %d: no validation pairs to condition on; no ligand samples", step)
      return
    pool = {k: np.concatenate([b[k] for b in batches])[:n] for k in modes.BATCH_KEYS}
    t0 = time.perf_counter()
    model = nnx.merge(built.defs.eval, state.ema, built.rest)
    ligands = runtime.host_value(modes.sample_ligand_given_protein(
      key, model, cfg, pool["tokens"], pool["lengths"], pool["ligand_lengths"]))
    if not primary:
      return
    smiles = [smiles_tok.decode(ligands[i, :pool["ligand_lengths"][i]])
              for i in range(len(ligands))]
    valid = [bool(is_valid(x)) for x in smiles]
    out = pathlib.Path(workdir) / "samples" / f"step_{step}.smi"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{x}\tvalid_protein_{i} step={step} valid={int(v)}\n"
                           for i, (x, v) in enumerate(zip(smiles, valid))))
    validity = sum(valid) / max(len(valid), 1)
    writer.write("sample", step, {"smiles_validity": validity, "checker": checker,
                                  "num_samples": len(smiles)})
    logger.info("step %d: %d ligands given validation proteins (%.1f s) -> %s; SMILES validity "
                "%.2f (%s); first: %s", step, len(smiles), time.perf_counter() - t0, out,
                validity, checker, smiles[0][:60] if smiles else "")

  return write


SAMPLE_WRITERS = {"sedd": _protein_sample_writer, "protein_ligand": _ligand_sample_writer}
