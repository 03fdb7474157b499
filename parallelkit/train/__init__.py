"""One training entry point: ``train(TrainConfig(...))`` or ``python -m parallelkit train``.

    config.py    TrainConfig and its checks (layout, batch arithmetic, sequence splits)
    data.py      synthetic or memory-mapped tokens; which rank reads which part of which sample
    model.py     model from a config, parallelize / pipeline stages, DDP, optimizer, LR schedule
    loop.py      train(): torchrun or local ranks; the step (micro-batches or 1F1B)
    resume.py    DCP checkpoints of everything a bit-exact resume needs, and the resume
    progress.py  tokens/s, MFU, peak memory, the progress bar, the loss plot
"""

from parallelkit.train.config import TrainConfig
from parallelkit.train.loop import run_rank, train
from parallelkit.train.progress import TrainResult

__all__ = ["TrainConfig", "TrainResult", "train", "run_rank"]
