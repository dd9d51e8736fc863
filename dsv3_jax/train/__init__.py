"""Pre-training (docs/architecture.md §4, §5, §8): losses, router balancing, AdamW schedule, Orbax checkpoints, loop."""
from .config import RunConfig, TrainConfig, load_run_config
from .trainer import Trainer, TrainingStopped, train

__all__ = ["RunConfig", "TrainConfig", "load_run_config", "Trainer", "TrainingStopped", "train"]
