"""The protein-ligand task of the generic trainer (`sedd_jax.training.task`, `cfg.task ==
"protein_ligand"`): the dual-track model, its training modes and their losses.

- `from_config` resolves `cfg.ligand.graph.tokens` from the prepared data's SMILES vocabulary
  (`resolve_ligand_vocab`), so the config saved with a run is self-contained.
- `draw`: the step key is split into (mode, loss, dropout) keys; with `cfg.mode == "all"` the
  mode is drawn once per step (`modes.draw_mode`) and shared by every micro-batch.
- `loss`: `modes.loss_fn` for a fixed mode, `modes.indexed_loss_fn` with the step's mode for
  `all`; metrics `loss/<mode>` = the loss of the step's mode (NaN for the other modes, so that
  logged rows average each mode over its own steps).
- `eval_loss`: `modes.eval_loss_fn` (every mode for `all`) times the batch size.
- `wrap_optimizer`: `modes.skip_unused_updates` (parameters a mode does not use get no update).
- `sample_hook`: ligands for the first validation proteins -> `samples/step_<n>.smi` and a
  `sample` metrics row with their SMILES validity.

Batches: `tokens (B, Lp)`, `lengths (B,)`, `ligand_tokens (B, Ll)`, `ligand_lengths (B,)` (+
`corpus_ligand_tokens`, `corpus_ligand_lengths` with `cfg.data.ligand_corpus`); real tokens are
counted on both tracks of the pairs.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sedd_jax.data import pipeline
from sedd_jax.data import store as store_lib
from sedd_jax.protein_ligand import conditional
from sedd_jax.protein_ligand import model as model_lib
from sedd_jax.protein_ligand import modes
from sedd_jax.protein_ligand import smiles as smiles_lib
from sedd_jax.training import runtime
from sedd_jax.training import task as task_lib

logger = logging.getLogger("sedd_jax.train")


@dataclasses.dataclass(frozen=True)
class ProteinLigandTask(task_lib.Task):
  """See the module docstring."""

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict) -> "ProteinLigandTask":
    model_lib.resolve_ligand_vocab(cfg)
    modes.check_mode(cfg)
    return cls(cfg, name="protein_ligand", batch_keys=modes.batch_keys(cfg),
               length_keys=("lengths", "ligand_lengths"), token_keys=("tokens", "ligand_tokens"))

  def build_model(self, seed: int | None = None) -> model_lib.ProteinLigandDDiT:
    seed = int(self.cfg.seed if seed is None else seed)
    return model_lib.build_model(self.cfg, nnx.Rngs(params=seed, dropout=seed + 1))

  def wrap_optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    return modes.skip_unused_updates(tx)

  def draw(self, key, batch, step) -> task_lib.Draw:
    k_mode, k_loss, k_drop = jax.random.split(key, 3)
    mode = modes.draw_mode(k_mode, self.cfg) if self.cfg.mode == modes.ALL else None
    return task_lib.Draw(rows={k: batch[k] for k in self.batch_keys}, shared=mode,
                         loss_key=k_loss, dropout_key=k_drop)

  def loss(self, model, rows, shared, key, step):
    if shared is None:
      loss, metrics = modes.loss_fn(model, rows, key, step, self.cfg)
    else:
      loss, metrics = modes.indexed_loss_fn(model, rows, key, step, self.cfg, shared)
    aux = {"loss_sum": loss * rows["tokens"].shape[0]}
    for i, name in enumerate(modes.MODES):
      aux[f"loss/{name}"] = jnp.where(metrics["mode"] == i, loss, jnp.nan)
    return loss, aux

  def eval_loss(self, model, batch, key):
    b = batch["tokens"].shape[0]
    sums = {k: v * b for k, v in modes.eval_loss_fn(model, batch, key, self.cfg).items()}
    sums["n_seqs"] = jnp.float32(b)
    sums["n_tokens"] = self.count_tokens(batch)[1]
    return sums

  def sample_hook(self, built, options, cache, writer, workdir, primary):
    """Ligands given the first `num_samples` validation proteins (target lengths = their
    reference ligands') -> step_<n>.smi (`SMILES<TAB>name`), SMILES validity logged as a
    `sample` row (`smiles_validity`, checked by RDKit if installed, else by grammar)."""
    del options, cache  # sample_ligand_given_protein is compiled (and cached) by nnx.jit
    cfg, n = self.cfg, int(self.cfg.training.num_samples)
    store = store_lib.Store(pipeline.resolve_path(cfg.data.prepared), "train")
    smiles_tok = store.smiles_tokenizer()

    def write(state, batches, key, step):
      if not batches:
        logger.warning("step %d: no validation pairs to condition on; no ligand samples", step)
        return
      pool = {k: np.concatenate([b[k] for b in batches])[:n] for k in modes.BATCH_KEYS}
      t0 = time.perf_counter()
      model = nnx.merge(built.defs.eval, state.ema, built.rest)
      ligands = runtime.host_value(conditional.sample_ligand_given_protein(
        key, model, cfg, pool["tokens"], pool["lengths"], pool["ligand_lengths"]))
      if not primary:
        return
      smiles = [smiles_tok.decode(ligands[i, :pool["ligand_lengths"][i]])
                for i in range(len(ligands))]
      report = smiles_lib.validity_report(smiles)
      valid, validity, checker = report["valid"], report["validity"], report["checker"]
      out = pathlib.Path(workdir) / "samples" / f"step_{step}.smi"
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text("".join(f"{x}\tvalid_protein_{i} step={step} valid={int(v)}\n"
                             for i, (x, v) in enumerate(zip(smiles, valid))))
      writer.write("sample", step, {"smiles_validity": validity, "checker": checker,
                                    "num_samples": len(smiles)})
      logger.info("step %d: %d ligands given validation proteins (%.1f s) -> %s; SMILES validity "
                  "%.2f (%s); first: %s", step, len(smiles), time.perf_counter() - t0, out,
                  validity, checker, smiles[0][:60] if smiles else "")

    return write
