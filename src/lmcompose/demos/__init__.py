"""Demos that reproduce results end to end: key-value arithmetic (paper §4.1) on models built here."""
