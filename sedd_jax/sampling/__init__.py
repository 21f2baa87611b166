"""Sampling, conditional generation, likelihood (negative ELBO), mutation effects, embeddings
and sample-quality reports.

  from sedd_jax.sampling import sampler, conditioning, likelihood, report
  x = sampler.sample(key, sampler.model_score_fn(model), graph, noise, (B, L), steps=128)
  scores = likelihood.score_sequences(model, graph, noise, ["MKV...", ...], max_length=L)

`first_hitting` is the sampler's exact absorbing sampler; `similarity` (k-mer, identity,
novelty) is the report's alignment half. `likelihood` holds the negative ELBO (`nelbo`, and
`score_sequences` over a list of sequences in packed batches), `mutations` the
log-likelihood change of variants of a wild type (`score_mutations`), `embedding` per-residue
and mean hidden states (`embed`, through `DDiT.hidden_states`). `report`, `similarity` and
`conditioning` import no model code; `sampler`, `first_hitting`, `likelihood`, `mutations`
and `embedding` take the model as an argument (`model_score_fn` / `model_log_score_fn` wrap
any DDiT-like callable; `embed` needs a DDiT's `hidden_states`).
"""

from sedd_jax.sampling import conditioning
from sedd_jax.sampling import embedding
from sedd_jax.sampling import first_hitting
from sedd_jax.sampling import likelihood
from sedd_jax.sampling import mutations
from sedd_jax.sampling import report
from sedd_jax.sampling import sampler
from sedd_jax.sampling import similarity
from sedd_jax.sampling.likelihood import nelbo
from sedd_jax.sampling.likelihood import NelboResult
from sedd_jax.sampling.likelihood import unigram_baseline
from sedd_jax.sampling.sampler import model_score_fn
from sedd_jax.sampling.sampler import sample
from sedd_jax.sampling.sampler import sample_batched

__all__ = ["conditioning", "embedding", "first_hitting", "likelihood", "mutations", "report",
           "sampler", "similarity",
           "nelbo", "NelboResult", "unigram_baseline", "model_score_fn", "sample",
           "sample_batched"]
