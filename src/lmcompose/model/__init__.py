"""The composed model: frozen transformers models wired together by hooks, decoding with every cache, text in and out."""
