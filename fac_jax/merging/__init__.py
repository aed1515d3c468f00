"""Merging: leaf-wise merge methods (methods), the memory-bounded streaming merge of checkpoint
folders (merge: `python -m fac_jax.merging.merge`), the Core-Cocktail recipe (cocktail) and merge
studies (merge_study). May import: top-level modules, model/, checkpoints/, speech/, data/,
train/."""
