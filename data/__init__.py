"""Datasets, class splits and transforms for GCD (entry point: data.get_datasets)."""
