"""Checkpoint scoring: CLIP fidelity and editability of a run's checkpoints, and the recommended one."""
