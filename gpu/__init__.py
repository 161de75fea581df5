"""GPU admission and the cross-process GPU semaphore (see the GPU issue)."""
