"""zoo: a model zoo for vision and multimodal pretraining.

    import zoo
    model = zoo.create_model("vit_tiny_patch4_32")          # an architecture, random init
    model = zoo.load("vit_tiny_patch4_32.mae_fractal")      # published weights, by name
    zoo.list_models("vit_*_patch4_*")
    result = zoo.pretrain("dino_vit_tiny_patch4_32_fractals", steps=50)   # a recipe on its built-in data
    result = zoo.sample("dit_tiny_patch2_8.digits", stitch=[("dit_nano_patch2_8.digits", 0.4)])  # T-Stitch
"""

from zoo.version import __version__  # noqa: E402

from zoo.errors import ZooError  # noqa: E402
from zoo.hub import create_model, list_models, load, publish, register_weights  # noqa: E402



def pretrain(recipe, *, data=None, overrides=(), run_dir=None, resume=False, overwrite=False, **values):
    """Train a recipe (an installed recipe's name, a YAML path or a dict) and return its RunResult.

    `overrides` are `--set` strings (`"optim.lr=1e-3"`); keyword values are dotted keys with `__` for
    the dots (`optim__lr=1e-3`) or the shortcuts steps, epochs, batch_size, lr, seed, publish."""
    import json

    from zoo.engine.trainer import pretrain as run

    shortcuts = {"steps": "schedule.steps", "epochs": "schedule.epochs", "batch_size": "data.batch_size",
                 "lr": "optim.lr", "seed": "seed", "publish": "output.publish"}
    lines = list(overrides) + [f"{shortcuts.get(k, k.replace('__', '.'))}={json.dumps(v)}" for k, v in values.items()]
    return run(recipe, data=data, overrides=lines, run_dir=run_dir, resume=resume, overwrite=overwrite)


def sample(model, **kwargs):
    """Class-conditional samples of a diffusion model (a name or a model), T-Stitched after `stitch=[(small,
    fraction), ...]`: `zoo.eval.sampling.generate`'s SampleResult (images in [0, 1], seconds, FLOPs, trace)."""
    from zoo.eval.sampling import generate

    return generate(model, **kwargs)


__all__ = ["__version__", "ZooError", "create_model", "list_models", "load", "publish", "register_weights", "pretrain",
           "sample"]
