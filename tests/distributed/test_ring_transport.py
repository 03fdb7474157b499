"""The slot protocol of the shm ring transport (the one cuda_ipc runs too): messages of every size
arrive intact, a slow receiver holds its sender back instead of being overwritten, and bad input,
a stuck peer or a dead one are clear errors naming the peer and the step, never a hang."""

import os
import re
import time

import pytest
import torch
import torch.distributed as dist

from parallelkit import mpu
from parallelkit._native import native
from parallelkit.launch import RankFailure
from parallelkit.ops import ring_transport
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close

SLOT = 64  # bytes: small, so that messages are cut into many fragments


def _message(rank, step, numel):
    return torch.arange(numel, dtype=torch.float32) + 1000 * rank + 100 * step


def _round_trip(world, slots, in_flight):
    """Messages of 0 bytes, under a slot, one slot, and many slots, `in_flight` started before
    the first wait: each arrives from the previous rank intact."""
    group = mpu.initialize(tp=world).tp.group
    rank = dist.get_rank(group)
    transport = ring_transport.create(group, "shm", slots=slots, slot_bytes=SLOT, timeout_s=30)
    assert (transport.name, transport.rank, transport.size) == ("shm", rank, world)
    sizes = [0, 3, SLOT // 4, 1000, 7, 16 * SLOT + 1]
    for first in range(0, len(sizes), in_flight):
        steps = range(first, min(first + in_flight, len(sizes)))
        recvs = {s: torch.full((sizes[s],), -1.0) for s in steps}
        exchanges = [transport.start(_message(rank, s, sizes[s]), recvs[s], s) for s in steps]
        for exchange in exchanges:
            exchange.wait()
        for s in steps:
            assert torch.equal(recvs[s], _message((rank - 1) % world, s, sizes[s])), s


@pytest.mark.parametrize("in_flight", [1, 3])
@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("world", [2, 4])
def test_messages_of_every_size_arrive_intact(world, slots, in_flight):
    run_on_ranks(_round_trip, world, world, slots, in_flight)


def _slow_receiver(backpressure):
    """Rank 1 starts receiving 0.5 s late. Each message is 16 fragments through 2 slots: without
    back-pressure rank 0 would overwrite them long before rank 1 reads them."""
    group = mpu.initialize(tp=2).tp.group
    rank = dist.get_rank(group)
    transport = ring_transport.create(group, "shm", slot_bytes=SLOT, timeout_s=30,
                                      backpressure=backpressure)
    numel = 16 * SLOT // 4
    recvs = [torch.zeros(numel) for _ in range(3)]
    dist.barrier(group)
    begin = time.monotonic()
    try:
        exchanges = [transport.start(_message(rank, s, numel), recvs[s], s) for s in range(3)]
        if rank == 1:
            time.sleep(0.5)
        for exchange in exchanges:
            exchange.wait()
    except RuntimeError as error:
        return str(error)
    for s, recv in enumerate(recvs):
        assert torch.equal(recv, _message(1 - rank, s, numel)), s
    return time.monotonic() - begin, transport.sender_stalls


def test_a_slow_receiver_holds_its_sender_back():
    (waited, stalls), _ = run_on_ranks(_slow_receiver, 2, True)
    assert waited >= 0.4  # rank 0 could not finish sending before rank 1 read
    assert stalls > 0      # ... because it found slots still full and waited


def test_without_back_pressure_the_same_exchange_is_corrupted():
    """The control: the protocol's back-pressure is what the test above relies on."""
    error = run_on_ranks(_slow_receiver, 2, False)[1]  # the receiver; its sender may not notice
    assert isinstance(error, str) and "overwrote fragment" in error, error


def _fused_ops_through_tiny_slots(op, chunks):
    """The fused ops over a shm ring whose slot holds a fraction of a chunk, against the unfused
    collectives."""
    group = mpu.initialize(tp=4).tp.group
    rank = dist.get_rank(group)
    transport = ring_transport.create(group, "shm", slots=2, slot_bytes=128, timeout_s=30)
    g = torch.Generator().manual_seed(rank)
    weight = torch.randn(6, 8, dtype=torch.float64, generator=g)
    if op == "all_gather_matmul":
        x = torch.randn(8, 8, dtype=torch.float64, generator=g)
        y, gathered = native.all_gather_matmul(x, weight, group, chunks, transport)
        full = [torch.empty_like(x) for _ in range(4)]
        dist.all_gather(full, x, group=group)
        assert torch.equal(gathered, torch.cat(full))
        expected = torch.cat(full) @ weight.t()
    else:
        x = torch.randn(16, 8, dtype=torch.float64, generator=g)
        y = native.matmul_reduce_scatter(x, weight, group, chunks, transport)
        expected = x @ weight.t()
        dist.all_reduce(expected, group=group)
        expected = expected.chunk(4)[rank]
    assert_close(y, expected, name=op, terms=8 * 4)


@pytest.mark.parametrize("chunks", [1, 2])
@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_fused_ops_through_slots_smaller_than_a_chunk(op, chunks):
    run_on_ranks(_fused_ops_through_tiny_slots, 4, op, chunks)


def _size_mismatch():
    """Rank 0 sends a longer message at step 1 than rank 1 expects; every rank of the ring
    raises (the first failure travels round the ring), none waits for the timeout."""
    group = mpu.initialize(tp=4).tp.group
    rank = dist.get_rank(group)
    transport = ring_transport.create(group, "shm", slot_bytes=SLOT, timeout_s=30)
    begin = time.monotonic()
    with pytest.raises(RuntimeError) as caught:
        for step in range(5):  # rank 0's failure at step 1 reaches rank 3 by step 4 at the latest
            numel = 20 if step == 1 and rank == 0 else 10
            transport.start(torch.zeros(numel), torch.zeros(numel), step).wait()
    return str(caught.value), time.monotonic() - begin


def test_unequal_messages_stop_every_rank_with_the_sizes_named():
    # Rank 1 (receiving 80 bytes from rank 0) or rank 0 (receiving 40 from rank 3) sees it
    # first; every other rank's error quotes that one.
    cause = (r"rank (0|3) \(the previous rank in the ring\) sent (80|40) bytes at ring step 1 "
             r"\(exchange 1\) but this rank receives (40|80): the ranks' buffers differ")
    for text, seconds in run_on_ranks(_size_mismatch, 4):
        assert re.search(cause, text), text
        assert seconds < 10


def _stuck_peer():
    group = mpu.initialize(tp=2).tp.group
    rank = dist.get_rank(group)
    transport = ring_transport.create(group, "shm", slot_bytes=SLOT, timeout_s=2.0)
    dist.barrier(group)  # so that a loaded machine cannot make step 0 itself time out
    if rank == 0:
        transport.start(torch.zeros(4), torch.zeros(4), 0).wait()
        with pytest.raises(RuntimeError, match=r"ring transport shm on rank 0: no progress for "
                                               r"\d+(\.\d+)? s while waiting for rank 1 \(the "
                                               r"previous rank in the ring\) to send ring step 7"):
            transport.start(torch.zeros(4), torch.zeros(4), 7).wait()
        dist.barrier(group)
    else:
        transport.start(torch.zeros(4), torch.zeros(4), 0).wait()
        dist.barrier(group)  # rank 1 never starts step 7; by now rank 0 gave up
        with pytest.raises(RuntimeError, match=r"rank 0 stopped the ring, so this rank stops too"
                                               r".*Its error: .*no progress"):
            transport.start(torch.zeros(4), torch.zeros(4), 7).wait()
        with pytest.raises(RuntimeError, match=r"this transport stopped there; make a new one"):
            transport.start(torch.zeros(4), torch.zeros(4), 8)


def test_a_stuck_peer_times_out_naming_it_and_the_step():
    run_on_ranks(_stuck_peer, 2)


def _peer_dies():
    group = mpu.initialize(tp=2).tp.group
    transport = ring_transport.create(group, "shm", slot_bytes=SLOT, timeout_s=60)
    if dist.get_rank(group) == 1:
        os._exit(3)
    transport.start(torch.zeros(4), torch.zeros(4), 5).wait()


def test_a_dead_peer_is_an_error_at_once_not_a_hang():
    begin = time.monotonic()
    with pytest.raises(RankFailure) as caught:
        run_on_ranks(_peer_dies, 2, timeout=30)
    text = str(caught.value)
    assert "died (exit code 3)" in text
    assert re.search(r"rank 1 \(pid \d+\), the previous rank in the ring, has exited; this rank "
                     r"was waiting for rank 1 \(the previous rank in the ring\) to send ring "
                     r"step 5", text), text
    assert time.monotonic() - begin < 15  # the 60 s ring timeout never came into it


def _bad_input():
    group = mpu.initialize(tp=2).tp.group
    transport = ring_transport.create(group, "shm", slot_bytes=SLOT, timeout_s=30)
    x = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match=r"send must be contiguous"):
        transport.start(x.t(), x, 0)
    with pytest.raises(RuntimeError, match=r"send \[4, 4\] torch.float32 on cpu and recv \[16\]"):
        transport.start(x, torch.zeros(16), 0)
    with pytest.raises(RuntimeError, match=r"ring transport shm moves CPU tensors, got one on meta"):
        transport.start(x.to("meta"), x.to("meta"), 0)
    w = torch.randn(3, 4)
    world = ring_transport.create(dist.group.WORLD, "shm", slot_bytes=SLOT, timeout_s=30)
    with pytest.raises(RuntimeError, match=r"all_gather_matmul: the shm transport was made for "
                                           r"rank \d of a ring of 4 but the group has this "
                                           r"process at rank \d of 2"):
        native.all_gather_matmul(x, w, group, 1, world)
    with pytest.raises(ValueError, match=r"ring transport 'nccl' must be one of"):
        with ring_transport.use("nccl"):
            pass
    with ring_transport.use("cuda_ipc"):
        with pytest.raises(ValueError, match=r"'cuda_ipc' moves cuda tensors, got tensors on cpu"):
            ring_transport.choose(group, torch.device("cpu"))
    with pytest.raises(ring_transport.RingTransportUnavailable,
                       match=r"the shm ring transport could not be set up: rank 0( \(global "
                             r"rank \d\))?: .*the ranks disagree on the slot size"):
        ring_transport.create(group, "shm", slot_bytes=SLOT * (1 + dist.get_rank(group)))
    os.environ[ring_transport.ENV] = "rdma"
    try:
        with pytest.raises(ValueError, match=r"PARALLELKIT_RING_TRANSPORT='rdma' must be one of"):
            ring_transport.requested()
    finally:
        del os.environ[ring_transport.ENV]


def test_bad_input_is_a_clear_error():
    run_on_ranks(_bad_input, 4)


def _chosen(kind):
    group = mpu.initialize(tp=2).tp.group
    with ring_transport.use(kind):
        return ring_transport.choose(group, torch.device("cpu"))


@pytest.mark.skipif(os.environ.get(ring_transport.ENV, "auto") != "auto",
                    reason=f"{ring_transport.ENV} chooses the transport")
def test_auto_takes_shared_memory_for_cpu_ranks_of_one_machine():
    assert run_on_ranks(_chosen, 2, "auto") == ["shm", "shm"]
    assert run_on_ranks(_chosen, 2, "c10d") == ["c10d", "c10d"]
