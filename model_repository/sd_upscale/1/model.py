"""Every model's model.py: the shared implementation; config.pbtxt's `kind` parameter says what it is."""

from sdmme.triton_model import DiffusionModel


class TritonPythonModel(DiffusionModel):
    pass
