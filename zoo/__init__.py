"""zoo: a model zoo for vision and multimodal pretraining.

    import zoo
    model = zoo.create_model("vit_tiny_patch4_32")          # an architecture, random init
    model = zoo.load("vit_tiny_patch4_32.mae_fractal")      # published weights, by name
    zoo.list_models("vit_*_patch4_*")
"""

__version__ = "0.1.0"

from zoo.errors import ZooError  # noqa: E402
from zoo.hub import create_model, list_models, load, publish, register_weights  # noqa: E402

__all__ = ["__version__", "ZooError", "create_model", "list_models", "load", "publish", "register_weights"]
