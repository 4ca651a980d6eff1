"""The Python environment each model archive carries (Triton's EXECUTION_ENV_PATH)."""
