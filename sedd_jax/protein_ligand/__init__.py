"""Protein-ligand SEDD: a dual-track DDiT (protein + SMILES ligand, cross-attention), its five
training modes (+ `all`), conditional sampling with classifier-free guidance, joint sampling
from noise and SMILES validity.

What a generic trainer needs (see `configs/protein_ligand.py`, `cfg.task == "protein_ligand"`):

  model = build_model(cfg, rngs)                       # also resolves cfg.ligand.graph.tokens
  loss, metrics = loss_fn(model, batch, key, step, cfg)
  metrics = eval_loss_fn(model, batch, key, cfg)
  ligands = sample_ligand_given_protein(key, model, cfg, protein_tokens, protein_lengths,
                                        ligand_lengths)
  tx = skip_unused_updates(tx)                          # no update for unused parameters

Sampling: `sample_conditional(..., guidance=W)` (`guided_log_score`), `sample_joint(key, model,
cfg, protein_lengths, ligand_lengths)`, `validity_report(smiles)` (RDKit or grammar).
"""

from sedd_jax.protein_ligand.joint import sample_joint
from sedd_jax.protein_ligand.model import build_model
from sedd_jax.protein_ligand.model import CrossAttention
from sedd_jax.protein_ligand.model import get_graphs
from sedd_jax.protein_ligand.model import GROUPS
from sedd_jax.protein_ligand.model import param_groups
from sedd_jax.protein_ligand.model import ProteinLigandDDiT
from sedd_jax.protein_ligand.model import resolve_ligand_vocab
from sedd_jax.protein_ligand.modes import ALL
from sedd_jax.protein_ligand.conditional import context_drop
from sedd_jax.protein_ligand.modes import draw_mode
from sedd_jax.protein_ligand.modes import eval_loss_fn
from sedd_jax.protein_ligand.smiles import grammar_valid_smiles
from sedd_jax.protein_ligand.conditional import guided_log_score
from sedd_jax.protein_ligand.modes import indexed_loss_fn
from sedd_jax.protein_ligand.modes import loss_fn
from sedd_jax.protein_ligand.modes import mode_loss
from sedd_jax.protein_ligand.modes import MODES
from sedd_jax.protein_ligand.conditional import sample_conditional
from sedd_jax.protein_ligand.conditional import sample_ligand_given_protein
from sedd_jax.protein_ligand.conditional import sample_protein_given_ligand
from sedd_jax.protein_ligand.modes import skip_unused_updates
from sedd_jax.protein_ligand.smiles import smiles_validity
from sedd_jax.protein_ligand.smiles import validity_checker
from sedd_jax.protein_ligand.smiles import validity_report

__all__ = [
    "ALL", "CrossAttention", "GROUPS", "MODES", "ProteinLigandDDiT", "build_model", "context_drop",
    "draw_mode", "eval_loss_fn", "get_graphs", "grammar_valid_smiles", "guided_log_score",
    "indexed_loss_fn", "loss_fn", "mode_loss", "param_groups", "resolve_ligand_vocab",
    "sample_conditional", "sample_joint", "sample_ligand_given_protein",
    "sample_protein_given_ligand", "skip_unused_updates", "smiles_validity", "validity_checker",
    "validity_report",
]
