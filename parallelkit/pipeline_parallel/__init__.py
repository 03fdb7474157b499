"""Pipeline parallelism: partitioning, schedules as data, a checker, a simulator, one executor.

    actions.py         Action, Schedule: a schedule as data (a list of actions per rank)
    schedules.py       the builders (GPipe, 1F1B, interleaved 1F1B, ZB-H1), placing the P2P
    check.py           replay with blocking P2P: deadlock and data-flow checker
    simulate.py        timeline, bubble fraction, activations in flight; format_timeline (text)
    timeline.py        python -m parallelkit.pipeline_parallel.timeline --schedule 1f1b --pp 4 --m 8
    partition.py       layers -> stages (by count or cost), virtual stages
    stage.py           PipelineStage: this rank's chunks, loss, groups, tied embedding weights
    backward_split.py  B (input gradient) / W (weight gradients) for zero-bubble schedules
    execute.py         run_schedule and the step functions
"""

from parallelkit.pipeline_parallel.actions import Action, Schedule, ScheduleError
from parallelkit.pipeline_parallel.check import check_schedule
from parallelkit.pipeline_parallel.execute import (gpipe_step, interleaved_1f1b_step,
                                                   one_f_one_b_step, run_schedule,
                                                   split_microbatches, train_step, zb_h1_step)
from parallelkit.pipeline_parallel.partition import (StageChunk, balanced_partition,
                                                     partition_layers, stage_chunks)
from parallelkit.pipeline_parallel.schedules import SCHEDULES, build_schedule
from parallelkit.pipeline_parallel.simulate import (Costs, Simulation, bubble_formula,
                                                    format_timeline, simulate)
from parallelkit.pipeline_parallel.stage import PipelineStage, shared_parameters

__all__ = [
    "Action", "Schedule", "SCHEDULES", "build_schedule", "ScheduleError", "check_schedule",
    "Costs", "Simulation", "simulate", "bubble_formula", "format_timeline",
    "balanced_partition", "partition_layers", "stage_chunks", "StageChunk",
    "PipelineStage", "shared_parameters",
    "run_schedule", "train_step", "gpipe_step", "one_f_one_b_step", "interleaved_1f1b_step",
    "zb_h1_step", "split_microbatches",
]
