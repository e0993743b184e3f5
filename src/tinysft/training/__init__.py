"""Training: one loop (``loop.fit``) for every task, one checkpoint protocol (``checkpoints``).

    sft.train                   chat SFT with LoRA / QLoRA (+ the preference term)
    classify.train_classifier   sequence classification with LoRA on an encoder
"""

from tinysft.training.checkpoints import TrainError, discard_unfinished, latest_checkpoint
from tinysft.training.classify import train_classifier
from tinysft.training.loop import TrainResult
from tinysft.training.sft import train

__all__ = ["TrainError", "TrainResult", "discard_unfinished", "latest_checkpoint", "train", "train_classifier"]
