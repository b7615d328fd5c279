"""Pure pieces of a composition: its config, the cross-attention module, masks, cross-tokenizer alignment, padding,
prompt tokens and the structure of a transformers model. No files, no training, nothing above this layer."""
