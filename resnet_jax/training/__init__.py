"""Training: state, optimizers, losses, sharded steps, the loop, and the ``Classifier`` facade."""

from resnet_jax.training.classifier import Classifier
from resnet_jax.training.config import base_config, model_from_config, validate
from resnet_jax.training.loop import TrainingDiverged, TrainResult, evaluate_loader, setup, train
from resnet_jax.training.optim import make_optimizer, make_schedule
from resnet_jax.training.preemption import Preempted
from resnet_jax.training.state import TrainState, create_train_state
from resnet_jax.training.steps import make_eval_step, make_train_step

__all__ = ["Classifier", "Preempted", "TrainResult", "TrainState", "TrainingDiverged", "base_config",
           "create_train_state", "evaluate_loader", "make_eval_step", "make_optimizer", "make_schedule",
           "make_train_step", "model_from_config", "setup", "train", "validate"]
