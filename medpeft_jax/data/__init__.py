"""Datasets, input pipelines and data regimes."""
