"""Task generators and scorers (e.g. the paper's key-value arithmetic, §4.1)."""
