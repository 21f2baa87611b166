"""sedd_jax: Score Entropy Discrete Diffusion (SEDD) for protein sequences in JAX / Flax NNX.

  import sedd_jax

  model = sedd_jax.load("runs/small")          # a run folder, a checkpoint folder or a bundle
  seqs = model.sample(8, length=120, seed=0)   # a list of str with .provenance
  scores = model.score(seqs)                   # negative ELBO per sequence (nats)

- `load(path, *, weights="ema")`: a `SeddModel` (or `ProteinLigandModel` for a protein-ligand
  run); see `sedd_jax.api`.
- `__version__`: the installed package's version.
Importing the package imports neither jax nor the model code; `load` does.
"""

from importlib import metadata as _metadata

try:
  __version__ = _metadata.version("sedd_jax")
except _metadata.PackageNotFoundError:  # a source tree that is not installed
  __version__ = "unknown"

_API = ("load", "SeddModel", "ProteinLigandModel", "Samples")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
  """The API's names, imported on first use (`sedd_jax.api`)."""
  if name in _API:
    from sedd_jax import api  # noqa: PLC0415
    return getattr(api, name)
  raise AttributeError(f"module 'sedd_jax' has no attribute {name!r}")
