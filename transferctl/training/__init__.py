"""Training a run: phases, the epoch loop and its device/precision runtime, the feature cache, the solved head, checkpoints, resume, observers, interrupts, distributed."""
