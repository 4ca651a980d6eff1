"""Shared runtime of the Stable Diffusion Triton models: input spec, validation, batching, pipelines."""
