"""SEDD on protein-ligand pairs: a protein track and a ligand (SMILES) track with cross-attention.

The model is `sedd_jax.protein_ligand.model.ProteinLigandDDiT`; the training modes are in
`sedd_jax.protein_ligand.modes` (`c.mode`, one of protein_only, ligand_only,
ligand_given_protein, protein_given_ligand, joint, all). The generic trainer recognises this
config by `c.task == "protein_ligand"`.

Variants, selected as ``--config=configs/protein_ligand.py:NAME``:

* ``tiny``: minutes on a laptop CPU on the bundled protein-ligand pairs (mode ``all``).
* ``small``: a GPU run: protein track SEDD-small width (768 hidden, 12 heads, cond 128) with
  8 blocks, protein length 512, ligand length 128.

Override any key on the command line: ``--config.mode=ligand_given_protein``.
"""

import importlib.util
import pathlib

import ml_collections

VARIANTS = ("tiny", "small")
MODES = ("protein_only", "ligand_only", "ligand_given_protein", "protein_given_ligand", "joint",
         "all")


def _uniref50():
  """configs/uniref50.py, loaded by path (config files are not a package)."""
  path = pathlib.Path(__file__).with_name("uniref50.py")
  spec = importlib.util.spec_from_file_location("sedd_jax_configs_uniref50", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_config() -> ml_collections.ConfigDict:
  """Every key the protein-ligand training job reads (GPU-sized defaults).

  Starts from configs/uniref50.py's base config (graph, noise, curriculum, model, optim,
  sampling, wandb are the protein model's) and adds the ligand track and the training mode.
  """
  c = _uniref50().base_config()
  c.task = "protein_ligand"  # the trainer dispatches on this key (uniref50.py has none)
  c.variant = "small"
  # Training mode: one of MODES. `all` draws one of the five others per step from the step key
  # (probabilities `mode_weights`, in the order of MODES[:5]; () = uniform). They also set the
  # context drop of classifier-free guidance (`sample --guidance W`): the *_only mode of a track
  # is its conditional mode with the context dropped, with probability w_only / (w_only +
  # w_given) (uniform: 0.5; `sedd_jax.protein_ligand.conditional.context_drop`).
  c.mode = "all"
  c.mode_weights = ()

  # Protein track (and the width shared by both tracks: cross-attention mixes the two streams,
  # so the ligand track has the same hidden size and number of blocks).
  c.model.update(n_blocks=8, length=512)  # length: maximum protein length
  c.model.cross_attention = True  # bidirectional protein <-> ligand cross-attention per layer

  # Ligand (SMILES) track.
  c.ligand = ml_collections.ConfigDict()
  c.ligand.length = 128  # maximum SMILES length in tokens
  # Ligand graph: SMILES ids of the prepared data's SmilesTokenizer without <mask> (so <mask> =
  # tokens is the absorbing state). 0 = read from <data.prepared>/smiles_vocab.json when the model
  # is built (sedd_jax.protein_ligand.resolve_ligand_vocab); set it to pin a vocabulary.
  c.ligand.graph = ml_collections.ConfigDict()
  c.ligand.graph.type = "absorb"
  c.ligand.graph.tokens = 0

  # Data: the pairs CSV (columns aa_sequence / smiles detected by sedd_jax.data.prepare) is
  # prepared on first use into `prepared` (with smiles_vocab.json beside the store).
  c.data.fasta = "data/protein_ligand_pairs.csv.gz"  # source (FASTA or pairs CSV)
  c.data.format = "csv"
  c.data.prepared = "data/prepared/protein_ligand"
  c.data.max_length = 5000  # longer proteins are kept and cropped to model.length by the pipeline
  c.data.max_ligand_length = c.ligand.get_ref("length")  # longer SMILES are dropped by prepare
  c.data.ligand_length = c.ligand.get_ref("length")  # ligand batch width
  c.data.pad_to = "full"
  # Unpaired ligands (sedd_jax.data.ligand_corpus): a SMILES file (CSV with a SMILES column, or
  # .smi) whose molecules the `ligand_only` mode trains on: each example's ligand is drawn from it
  # with probability ligand_corpus_fraction, else it is the pair's own. '' = none. The bundled
  # data/moses_smiles_every8.csv.gz holds 198,083 drug-like molecules (MOSES); the pairs hold 458
  # distinct ligands. The unconditional ligand score of classifier-free guidance then models
  # that mixture.
  c.data.ligand_corpus = ""
  c.data.ligand_corpus_fraction = 0.75

  c.training.update(steps=200_000, eval_every=2000, ckpt_every=2000, milestone_every=50_000)
  # What `sample` generates for this task: ligand_given_protein | protein_given_ligand | joint.
  c.sampling.task = "ligand_given_protein"
  return c


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the config of `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(
        f"unknown variant {variant!r} of configs/protein_ligand.py; choose one of {VARIANTS}")
  c = base_config()
  c.variant = variant
  if variant == "tiny":
    c.model.update(hidden_size=64, n_heads=4, n_blocks=2, cond_dim=32, dropout=0.0, length=256,
                   dtype="float32", attention="xla")
    c.ligand.length = 128
    c.training.update(batch_size=16, steps=600, log_every=25, eval_every=200, eval_batches=4,
                      sample_every=300, num_samples=4, ckpt_every=200, milestone_every=0)
    c.optim.update(lr=2e-3, warmup=50)
    c.sampling.steps = 64
  elif variant == "small":
    c.model.update(hidden_size=768, n_heads=12, n_blocks=8, cond_dim=128, length=512)
    c.ligand.length = 128
    c.training.batch_size = 64
  return c
