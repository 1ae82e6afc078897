"""Datasets, class splits, transforms and loaders for GCD: the task of a run (task), the
community data API (get_datasets), the training and evaluation samplers (samplers), the
loaders of a run (loaders), one module per dataset."""
