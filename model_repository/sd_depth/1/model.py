from sdmme.triton_model import DiffusionModel


class TritonPythonModel(DiffusionModel):
    spec_name = "sd_depth"
