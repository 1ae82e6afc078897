"""Evaluation, logging, checkpoint and distributed helpers."""
