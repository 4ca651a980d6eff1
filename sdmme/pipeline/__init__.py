"""What shapes a pipeline call: the runner, and the settings that make it fast (speed, the sync-free loop,
CUDA graphs, compile)."""
