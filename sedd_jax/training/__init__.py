"""Training: state and optimizer (`state`), the Task protocol (`task`) and the protein-only
SEDD task (`sedd_task`; protein-ligand: `sedd_jax.protein_ligand.task`), jitted steps and
set-up (`step`), mesh and shardings (`sharding`), the run's orbax checkpoints
(`checkpointer`), the checkpoint format and inference loading (`checkpoint`),
console/JSONL/wandb metrics (`metrics`), and the job: `loop.train` (set-up in `run`, periodic
actions in `hooks`, the workdir's checks, lock and --fresh in
`workdir`, signals and prefetching in `runtime`).

The command line is `sedd_jax.train` (`python -m sedd_jax.train --config=configs/uniref50.py:tiny`).
For sampling and evaluation:

  from sedd_jax.training.checkpoint import load_for_inference
  model, cfg, graph, noise = load_for_inference("runs/tiny")   # EMA weights, eval mode
"""
