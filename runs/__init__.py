"""A run's life cycle: its folder, lock and shared state (run), the checkpoints' layout
(checkpoints), what --resume continues (resume), the logs cut back for a resume (logs), and
what it prints and records of its results (results)."""
