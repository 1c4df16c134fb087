"""Training: the config schema and recipes, the lr rules, the loop with exact resume, the run folder.

    from nin.engine import recipe, train
    train(recipe("fast", "mnist"), "runs/mnist-fast")

Modules, in the order they build on each other: `config` (TrainConfig, the recipes PAPER / CAFFE / FAST,
--set overrides), `schedule` (lr_at, the plateau rule), `metrics` (metrics.jsonl / .csv / TensorBoard),
`optim` (parameter groups, SGD, weight averaging), `run_folder` (the lock and checks), `state` (RunState, Run),
`start` (start or resume a run), `loop` (train_step, train_one_epoch, end_epoch, train).
"""

from nin.engine.config import (
                               CAFFE,
                               FAST,
                               PAPER,
                               RECIPES,
                               TrainConfig,
                               apply_overrides,
                               fitted_to_model,
                               recipe,
                               starting_from,
                               validate,
)
from nin.engine.loop import train, train_step
from nin.engine.metrics import read_metrics
from nin.engine.optim import make_optimizer
from nin.engine.schedule import PlateauRule, lr_at, total_steps
from nin.engine.start import data_files, planned_config

__all__ = ["TrainConfig", "PAPER", "CAFFE", "FAST", "RECIPES", "recipe", "apply_overrides", "fitted_to_model", "validate",
           "starting_from", "lr_at", "total_steps", "PlateauRule", "make_optimizer", "read_metrics", "train",
           "train_step", "data_files", "planned_config"]
