"""Files and data: atomic writes, composition files, base models from disk, JSONL data, tokenized datasets, batches,
the augment-state cache and input checks. Functions here take models as arguments and never import the model layer."""
