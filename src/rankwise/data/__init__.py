"""Datasets: GLUE (hub or local mirror) and LRA ListOps (generated)."""
