"""Training: state and optimizer (`state`), the model and loss of a config's task (`task`:
protein-only SEDD or protein-ligand), jitted steps, shardings and set-up (`step`), orbax
checkpoints and inference loading (`checkpoint`), console/JSONL/wandb metrics (`metrics`).

The job itself is `sedd_jax.train` (`python -m sedd_jax.train --config=configs/uniref50.py:tiny`).
For sampling and evaluation:

  from sedd_jax.training.checkpoint import load_for_inference
  model, cfg, graph, noise = load_for_inference("runs/tiny")   # EMA weights, eval mode
"""
