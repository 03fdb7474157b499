"""Pipeline schedules as data (pure Python): deadlock-free, textbook bubbles, activations held,
partitioning, the B/W backward split, and bad input."""

import copy

import pytest
import torch
from torch import nn

from parallelkit.pipeline_parallel import (Action, Costs, Schedule, ScheduleError, balanced_partition,
                                           bubble_formula, build_schedule, check_schedule,
                                           format_timeline, partition_layers, simulate,
                                           split_microbatches, stage_chunks)
from parallelkit.pipeline_parallel import timeline
from parallelkit.pipeline_parallel.backward_split import backward_input
from parallelkit.pipeline_parallel.check import replay
from parallelkit.pipeline_parallel.actions import B, F, RECV_B, RECV_F, SEND_B, SEND_F, W
from parallelkit.models.tinylm import TinyConfig, TinyLM

PPS = [1, 2, 3, 4, 5, 8, 16]


def microbatch_counts(pp):
    return sorted({1, 2, pp - 1, pp, pp + 1, 2 * pp + 1, 64} - {0})


def all_configs():
    for pp in PPS:
        for m in microbatch_counts(pp):
            for name in ("gpipe", "1f1b", "zb-h1"):
                yield name, pp, m, 1
            if m >= pp and pp > 1:
                for v in (2, 3):
                    yield "interleaved-1f1b", pp, m, v


# -------------------------------------------------------------------------- deadlock freedom
def test_every_schedule_replays_to_the_end_under_blocking_p2p():
    """build_schedule checks; check again explicitly, and that every action ran on every rank."""
    count = 0
    for name, pp, m, v in all_configs():
        schedule = build_schedule(name, pp, m, v)
        check_schedule(schedule)
        for rank in range(pp):
            computes = [a for a in schedule.actions[rank] if not a.is_comm]
            assert sum(a.kind == F for a in computes) == m * v
            assert sum(a.kind == B for a in computes) == m * v
            assert sum(a.kind == W for a in computes) == (m * v if name == "zb-h1" else 0)
        count += 1
    assert count > 150


def test_sends_and_receives_pair_up_in_order_on_every_channel():
    schedule = build_schedule("interleaved-1f1b", 2, 5, 2)  # rank 0 <-> 1 carry F and B both ways
    sent, received = {}, {}
    for rank in range(schedule.pp):
        for action in schedule.actions[rank]:
            if action.is_comm:
                peer, message = schedule.message(rank, action)
                if action.kind in (SEND_F, SEND_B):
                    sent.setdefault((rank, peer), []).append(message)
                else:
                    received.setdefault((peer, rank), []).append(message)
    assert sent == received and set(sent) == {(0, 1), (1, 0)}


def _hand_made(actions, pp=2, m=1):
    return Schedule("hand-made", pp, m, 1, tuple(tuple(Action(*a) for a in rank) for rank in actions))


def test_checker_finds_deadlock():
    # rank 1 waits for a gradient before it sends the activation that rank 0 needs first
    good = [[(F, 0), (SEND_F, 0), (RECV_B, 0), (B, 0)],
            [(RECV_F, 0), (F, 0), (B, 0), (SEND_B, 0)]]
    check_schedule(_hand_made(good))
    bad = [[(RECV_B, 0), (F, 0), (SEND_F, 0), (B, 0)], good[1]]
    with pytest.raises(ScheduleError, match="deadlocks"):
        check_schedule(_hand_made(bad))


def test_checker_models_blocking_sends():
    # rank 0's lone send of F1 waits for rank 1 to post its receive, which comes after rank 1's
    # lone send of B0, which waits for rank 0's receive, which comes after F2: buffered (gloo)
    # sends would get through, NCCL would hang, so the checker rejects it
    schedule = _hand_made([
        [(F, 0), (SEND_F, 0), (F, 1), (SEND_F, 1), (F, 2), (SEND_F, 2), (RECV_B, 0), (B, 0),
         (RECV_B, 1), (B, 1), (RECV_B, 2), (B, 2)],
        [(RECV_F, 0), (F, 0), (B, 0), (SEND_B, 0), (W, 0), (RECV_F, 1), (F, 1), (B, 1),
         (SEND_B, 1), (W, 1), (RECV_F, 2), (F, 2), (B, 2), (SEND_B, 2), (W, 2)]], m=3)
    replay(schedule, rendezvous=False)
    with pytest.raises(ScheduleError, match="rank 0 waits at \\[SEND_F1\\]"):
        check_schedule(schedule)


def test_checker_finds_order_mismatch_and_missing_data():
    swapped = [[(F, 0), (SEND_F, 0), (F, 1), (SEND_F, 1), (RECV_B, 0), (B, 0), (RECV_B, 1), (B, 1)],
               [(RECV_F, 1), (RECV_F, 0), (F, 0), (B, 0), (SEND_B, 0), (F, 1), (B, 1), (SEND_B, 1)]]
    with pytest.raises(ScheduleError, match="message #0 sent is .* but the receiver expects"):
        check_schedule(_hand_made(swapped, m=2))
    no_forward = [[(F, 0), (SEND_F, 0), (RECV_B, 0), (B, 0)],
                  [(RECV_F, 0), (B, 0), (F, 0), (SEND_B, 0)]]
    with pytest.raises(ScheduleError, match="backward before its forward"):
        check_schedule(_hand_made(no_forward))
    never_sent = [[(F, 0), (SEND_F, 0), (RECV_B, 0), (B, 0)], [(RECV_F, 0), (F, 0), (B, 0)]]
    with pytest.raises(ScheduleError, match="rank 0 waits at \\[SEND_F0 RECV_B0\\]"):
        check_schedule(_hand_made(never_sent))


# ------------------------------------------------------------------------------ simulation
@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name):
    for pp in (2, 4, 8):
        for m in (pp, 2 * pp + 1, 32):
            for costs in (Costs(1, 1, 1), Costs(1, 2, 0), Costs(1.5, 1, 2)):
                sim = simulate(build_schedule(name, pp, m), costs)
                assert sim.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1), abs=1e-12)


def test_interleaved_bubble_is_p_minus_1_over_vm_plus_p_minus_1():
    for pp in (2, 4, 8):
        for m in (pp, 2 * pp, 2 * pp + 1, 4 * pp):
            for v in (2, 3, 4):
                sim = simulate(build_schedule("interleaved-1f1b", pp, m, v))
                assert sim.bubble_fraction == pytest.approx((pp - 1) / (v * m + pp - 1), abs=1e-12)


def test_zb_h1_bubble_is_a_third_of_1f1b_when_f_b_w_equal():
    equal = Costs(1, 1, 1)
    for pp in (2, 4, 8, 16):
        for m in (pp, 2 * pp + 1, 64):
            zb = simulate(build_schedule("zb-h1", pp, m), equal)
            one_f_one_b = simulate(build_schedule("1f1b", pp, m), equal)
            assert max(zb.idle) <= max(one_f_one_b.idle) / 3 + 1e-9  # (p-1) vs 3(p-1) units
            assert zb.bubble_fraction < one_f_one_b.bubble_fraction
            assert zb.bubble_fraction == pytest.approx(bubble_formula("zb-h1", pp, m), abs=1e-12)
            assert max(zb.peak_activations) <= pp  # ZB-H1 keeps 1F1B's memory


def test_activations_in_flight():
    for pp in (2, 4, 8):
        for m in (1, pp, 3 * pp):
            assert simulate(build_schedule("1f1b", pp, m)).peak_activations == tuple(
                min(pp - r, m) for r in range(pp))
            assert set(simulate(build_schedule("gpipe", pp, m)).peak_activations) == {m}


def test_message_time_lengthens_the_step_and_rendezvous_never_shortens_it():
    schedule = build_schedule("1f1b", 4, 8)
    free, slow = simulate(schedule, Costs(1, 2, 0)), simulate(schedule, Costs(1, 2, 0, p2p=0.25))
    assert slow.makespan > free.makespan and slow.busy == free.busy
    for name, pp, m, v in [("zb-h1", 4, 9, 1), ("interleaved-1f1b", 4, 8, 2)]:
        s = build_schedule(name, pp, m, v)
        assert simulate(s, rendezvous=True).makespan >= simulate(s).makespan


def test_per_rank_costs_show_an_unbalanced_last_stage():
    schedule = build_schedule("1f1b", 4, 8)
    slow_last = [Costs(1, 2, 0)] * 3 + [Costs(2, 4, 0)]  # e.g. a large vocabulary head
    sim = simulate(schedule, slow_last)
    assert sim.makespan > simulate(schedule, Costs(1, 2, 0)).makespan
    assert sim.idle[3] == min(sim.idle) and sim.idle[0] > 2 * sim.idle[3]
    assert "costs per rank" in format_timeline(sim)
    with pytest.raises(ValueError, match="3 per-rank costs for pp=4"):
        simulate(schedule, slow_last[:3])


def test_timeline_text_and_cli(capsys):
    text = format_timeline(simulate(build_schedule("1f1b", 2, 3), Costs(1, 2, 0)))
    assert "rank  0 | F0 F1 .. .. B0 B0 F2 B1 B1 .. B2 B2" in text
    assert "rank  1 | .. F0 B0 B0 F1 B1 B1 F2 B2 B2 .. .." in text
    assert "bubble fraction:    0.2500" in text and "formula 0.2500" in text
    timeline.main(["--schedule", "interleaved-1f1b", "--pp", "2", "--m", "4", "--actions"])
    out = capsys.readouterr().out
    assert "rank 1: [RECV_F0] F0" in out and "F0.1" in out


# ---------------------------------------------------------------------------- bad input
def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="at least pp=4 micro-batches"):
        build_schedule("interleaved-1f1b", 4, 3, 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("2f2b", 4, 8)
    with pytest.raises(ValueError, match="one model chunk per rank"):
        build_schedule("1f1b", 4, 8, 2)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        build_schedule("1f1b", 4, 0)


def test_microbatch_size_must_divide_the_batch():
    assert [t.shape for t in split_microbatches(torch.zeros(4, 6), 3, dim=1)] == [(4, 2)] * 3
    with pytest.raises(ValueError, match="does not split into m=4 equal micro-batches"):
        split_microbatches(torch.zeros(4, 6), 4, dim=1)


# ----------------------------------------------------------------------------- partitioning
def test_partition_by_count_and_by_cost():
    assert [len(r) for r in balanced_partition([1] * 10, 4)] in ([3, 3, 2, 2], [2, 3, 2, 3],
                                                                 [3, 2, 3, 2], [2, 2, 3, 3])
    assert [len(p) for p in partition_layers([nn.Identity()] * 10, 4)] == [3, 3, 2, 2]
    assert balanced_partition([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    costs = [1, 1, 1, 1, 1, 5]
    parts = balanced_partition(costs, 3)
    assert parts[-1] == range(5, 6) and max(sum(costs[i] for i in r) for r in parts) == 5
    assert [i for r in parts for i in r] == list(range(6))  # contiguous, every layer once


def test_virtual_stages_interleave_chunks_over_ranks():
    layers = [nn.Linear(2, 2) for _ in range(8)]
    pre, post = nn.Embedding(4, 2), nn.Linear(2, 4)
    chunks = {r: stage_chunks(layers, r, 2, virtual_pp=2, pre=pre, post=post) for r in range(2)}
    # global stage s = chunk * pp + rank holds layers 2s, 2s+1
    assert list(chunks[0][1].layers) == layers[4:6] and list(chunks[1][0].layers) == layers[2:4]
    assert chunks[0][0].pre is pre and chunks[0][1].pre is None
    assert chunks[1][1].post is post and chunks[1][0].post is None and chunks[0][1].post is None


def test_bad_partitions():
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 pipeline stages"):
        partition_layers([nn.Identity()] * 3, 4)
    with pytest.raises(ValueError, match="divisible by pp\\*virtual_pp=8, got 12"):
        partition_layers([nn.Identity()] * 12, 4, virtual_pp=2)
    with pytest.raises(ValueError, match="2 layer costs for 3 layers"):
        partition_layers([nn.Identity()] * 3, 2, costs=[1, 1])


# ------------------------------------------------------------------------- B/W split
class _SharedWeight(nn.Module):
    """One Linear used twice: its weight hangs off two nodes of the input path."""

    def __init__(self, h):
        super().__init__()
        self.linear, self.norm = nn.Linear(h, h), nn.LayerNorm(h)

    def forward(self, x):
        return self.linear(torch.tanh(self.linear(self.norm(x)))) * x


@pytest.mark.parametrize("shared", [False, True], ids=["blocks", "shared-weight"])
def test_split_backward_equals_full_backward(shared):
    torch.manual_seed(0)
    blocks = list(TinyLM(TinyConfig(layers=2)).blocks)
    stage = nn.Sequential(blocks[0], _SharedWeight(32), blocks[1]) if shared else nn.Sequential(*blocks)
    stage = stage.double()
    reference = copy.deepcopy(stage)
    x, grad = torch.randn(2, 8, 2, 32, dtype=torch.float64).unbind(0)
    x_ref = x.clone().requires_grad_()
    reference(x_ref).backward(grad)

    x_in = x.clone().requires_grad_()
    grad_input, weight_grad = backward_input(stage(x_in), grad, x_in)
    assert all(p.grad is None for p in stage.parameters())  # B leaves the weights alone
    torch.testing.assert_close(grad_input, x_ref.grad, rtol=1e-12, atol=1e-12)
    weight_grad()
    for (name, p), q in zip(stage.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
