"""General utilities that know nothing of GET: distributed helpers (dist), random streams
(rng), logging and TensorBoard (logging_utils), files that survive a kill (io), stop signals
(signals)."""
