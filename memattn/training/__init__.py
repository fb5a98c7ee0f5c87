"""Training: the one fine-tuning loop (``finetune``: accelerate, EMA, seeded and bit-exact on resume),
its configuration, data sources, checkpoints and the training-time memorization filters. The testbed's
recipe is a configuration of this loop (``memattn.testbed.train``)."""

from memattn.training.checkpoints import latest_checkpoint, read_log
from memattn.training.config import CHECKPOINTS, LOG_FILE, MITIGATIONS, FinetuneConfig, MitigationConfig
from memattn.training.data import TrainData, load_folder_data, load_testbed_data
from memattn.training.loop import Finetuner
from memattn.training.run import finetune

__all__ = [
    "CHECKPOINTS",
    "LOG_FILE",
    "MITIGATIONS",
    "FinetuneConfig",
    "Finetuner",
    "MitigationConfig",
    "TrainData",
    "finetune",
    "latest_checkpoint",
    "load_folder_data",
    "load_testbed_data",
    "read_log",
]
