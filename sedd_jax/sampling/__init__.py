"""Sampling, conditional generation, likelihood (negative ELBO) and sample-quality reports.

  from sedd_jax.sampling import sampler, conditioning, likelihood, report
  x = sampler.sample(key, sampler.model_score_fn(model), graph, noise, (B, L), steps=128)

`first_hitting` is the sampler's exact absorbing sampler; `similarity` (k-mer, identity,
novelty) is the report's alignment half. `report`, `similarity` and `conditioning` import no
model code; `sampler`, `first_hitting` and `likelihood` need only the diffusion core
(`model_score_fn` / `model_log_score_fn` take any DDiT-like callable).
"""

from sedd_jax.sampling import conditioning
from sedd_jax.sampling import first_hitting
from sedd_jax.sampling import likelihood
from sedd_jax.sampling import report
from sedd_jax.sampling import sampler
from sedd_jax.sampling import similarity
from sedd_jax.sampling.likelihood import nelbo
from sedd_jax.sampling.likelihood import NelboResult
from sedd_jax.sampling.likelihood import unigram_baseline
from sedd_jax.sampling.sampler import model_score_fn
from sedd_jax.sampling.sampler import sample
from sedd_jax.sampling.sampler import sample_batched

__all__ = ["conditioning", "first_hitting", "likelihood", "report", "sampler", "similarity",
           "nelbo", "NelboResult", "unigram_baseline", "model_score_fn", "sample",
           "sample_batched"]
