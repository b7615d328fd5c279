"""Demos that reproduce results end to end: key-value arithmetic (paper §4.1) on models built here, and facts
composed into the real SmolLM2-135M."""
