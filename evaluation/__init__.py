"""Evaluation: Hungarian-matched accuracy (accuracy), images through a model with the outputs
gathered (predict), the cache of the frozen part (cache), a stage-2 model's metrics on its
splits (evaluate), what clusters show without ground truth (clusters), and the estimate of K
(k_estimate)."""
