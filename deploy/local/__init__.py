"""Emulation on this machine: the pip tritonserver (make serve) and the local multi-model endpoint."""
