"""Protein (and protein-ligand) data: tokenizers, streaming readers, prepared stores, batches.

* `tokenizers`: ProteinTokenizer (ESM-2 alphabet, <pad> = 1, <mask> = 32), SmilesTokenizer.
* `fasta`: streaming FASTA / peers' layout / pairs CSV readers with file:line errors.
* `prepare`: `python -m sedd_jax.data.prepare` -> memory-mappable store.
* `store`: reading a store (`open_store(root, split)`).
* `pipeline`: grain batches (`make_iterator`, `ensure_prepared`, `padding_fraction`,
  `pack_sequences`).

Submodules are imported on use (`from sedd_jax.data import pipeline`); grain is imported only
when an iterator is built.
"""
