"""Stable Diffusion on Triton: the runtime every model shares (see docs/architecture.md)."""

# Each model is a process of its own with torch's OpenMP threads; where several share the CPU cores, a
# spinning thread starves the others' (measured: tiny calls of 0.05 s took 10 s with four models busy).
# The model processes use this policy (sdmme.triton_model sets it before torch is imported).
OMP_WAIT_POLICY = "PASSIVE"
