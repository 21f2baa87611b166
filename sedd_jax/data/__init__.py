"""Protein (and protein-ligand) data: tokenizers, streaming readers, prepared stores, batches.

* `tokenizers`: ProteinTokenizer (ESM-2 alphabet, <pad> = 1, <mask> = 32), SmilesTokenizer.
* `fasta`: streaming FASTA / peers' layout readers with file:line errors.
* `pairs`: streaming protein-ligand CSV/TSV reader with file:line errors.
* `smiles_grammar`: the grammar check of SMILES (no RDKit).
* `prepare`: `python -m sedd_jax.data.prepare` -> memory-mappable store.
* `store_writer`: the filtering, deduplicating, splitting pass that writes a store.
* `store`: reading a store (`open_store(root, split)`; `is_store(path)`: a store's folder).
* `pipeline`: grain batches (`make_iterator`, `ensure_prepared`, `pack_sequences`).
* `batching`: length-bucketed batches and `padding_fraction`.
* `reference`: training split, protein-ligand pairs and padding for sample/evaluate.

Submodules are imported on use (`from sedd_jax.data import pipeline`); grain is imported only
when an iterator is built.
"""
