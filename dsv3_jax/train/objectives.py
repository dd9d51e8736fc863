"""``train.objective`` → the loop that trains it (docs/design.md §Post-training): ``pretrain`` and ``sft``
share the pre-training ``Trainer`` (SFT differs only in its data: assistant-only loss masks on packed
conversations), ``distill`` is that loop with a teacher's logits as the target, ``grpo`` has its own
sample-score-update loop."""
from __future__ import annotations

from .config import RunConfig
from .distill import DistillTrainer
from .grpo_trainer import GRPOTrainer
from .trainer import Trainer


def train(run: RunConfig, log=print) -> dict:
    """Run ``run`` to ``train.steps`` (resuming its latest checkpoint) with the loop of its objective."""
    if run.train.objective == "grpo":
        return GRPOTrainer(run, log=log).train()
    if run.train.objective == "distill":
        return DistillTrainer(run, log=log).train()
    return Trainer(run, log=log).train()


__all__ = ["train"]
