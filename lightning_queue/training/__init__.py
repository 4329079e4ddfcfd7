"""Training: algorithms that optimize an agent against the fleet.

* :class:`Trainer` runs an :class:`Algorithm` (``fit``) or an agent inline (``dev``);
* :class:`APO`, an LLM-driven prompt optimizer (beam search, critic, paired comparisons);
* :class:`Dataset`, inputs with stable ids, from JSONL or any iterable, split into train and val.

The package sits between ``experiments`` (whose statistics it uses) and ``ops``: it uses the
client, and the worker's agent code for ``dev``; nothing below imports it.
"""

from lightning_queue.training.algorithm import Algorithm, Evaluation, RunState, RunStats, TrainingRun
from lightning_queue.training.apo import APO, APOConfig, APOResult, Candidate, LineageStep, Promotion, lineage
from lightning_queue.training.critic import Critic, CriticSettings
from lightning_queue.training.datasets import Dataset, Example, input_id
from lightning_queue.training.trainer import Trainer

__all__ = [
    "APO",
    "APOConfig",
    "APOResult",
    "Algorithm",
    "Candidate",
    "Critic",
    "CriticSettings",
    "Dataset",
    "Evaluation",
    "Example",
    "LineageStep",
    "Promotion",
    "RunState",
    "RunStats",
    "Trainer",
    "TrainingRun",
    "input_id",
    "lineage",
]
