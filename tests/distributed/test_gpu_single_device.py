"""Sharded ops on one GPU: two ranks in two processes share cuda:0, joined by gloo on CUDA tensors
(NCCL refuses two ranks on one GPU), so the compiled Triton kernels run with the collectives
between them. Each rank's loss, output and gradient slice are checked against float64 autograd
on the full tensors. Only ops whose collectives are all-reduces (gloo's CUDA support) are here.
"""

import pytest
import torch
import torch.nn.functional as F

from parallelkit import mpu
from parallelkit.ops._backend import use_triton
from parallelkit.ops.cross_entropy import vocab_parallel_cross_entropy
from parallelkit.ops.norms import parallel_rms_norm
from parallelkit.testing import run_on_ranks
from parallelkit.testing.tolerances import assert_close

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TP = 2
SAYS = (f"multi-rank on one GPU: {TP} processes share cuda:0, joined by gloo on CUDA tensors "
        "(NCCL refuses two ranks on one GPU)")


def _cross_entropy(tp):
    state = mpu.initialize(tp=tp)
    g = torch.Generator().manual_seed(0)
    full = (3 * torch.randn(64, 1000, generator=g, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 1000, (64,), generator=g)
    expected = F.cross_entropy(full, targets)
    expected.backward()
    shard = full.detach().chunk(tp, -1)[state.tp.rank].float().cuda().requires_grad_()
    assert use_triton(shard)
    loss = vocab_parallel_cross_entropy(shard, targets.cuda(), state.tp.group)
    loss.backward()
    terms = 1000 + 64  # the softmax over the vocabulary, the mean over the tokens
    assert_close(loss.cpu(), expected.detach(), name="loss", terms=terms)
    assert_close(shard.grad.cpu(), full.grad.chunk(tp, -1)[state.tp.rank], name="grad",
                 terms=terms)
    return torch.cuda.get_device_name()


def _rms_norm(tp, dtype):
    state = mpu.initialize(tp=tp)
    g = torch.Generator().manual_seed(1)

    def rounded(t):  # what the ranks will see, so that the reference starts from the same values
        return t.to(dtype).double()

    full = rounded(torch.randn(48, 512, generator=g, dtype=torch.float64)).requires_grad_()
    weight = rounded(1 + 0.25 * torch.randn(512, generator=g, dtype=torch.float64)).requires_grad_()
    dy = rounded(torch.randn(48, 512, generator=g, dtype=torch.float64))
    expected = full * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    expected.backward(dy)

    def local(t):
        return t.detach().chunk(tp, -1)[state.tp.rank].to(dtype).cuda().requires_grad_()

    x, w = local(full), local(weight)
    y = parallel_rms_norm(x, w, 1e-6, state.tp.group)
    y.backward(local(dy).detach())
    rank = state.tp.rank
    terms = 512 + 48  # the statistics and dx over the hidden dim, dweight over the rows
    assert_close(y.cpu(), expected.detach().chunk(tp, -1)[rank], name="y", terms=terms)
    assert_close(x.grad.cpu(), full.grad.chunk(tp, -1)[rank], name="dx", terms=terms)
    assert_close(w.grad.cpu(), weight.grad.chunk(tp, -1)[rank], name="dweight", terms=terms)
    return torch.cuda.get_device_name()


def test_vocab_parallel_cross_entropy_on_two_ranks_of_one_gpu():
    print(SAYS)
    assert len(run_on_ranks(_cross_entropy, TP, TP, timeout=300)) == TP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parallel_rms_norm_on_two_ranks_of_one_gpu(dtype):
    print(SAYS)
    run_on_ranks(_rms_norm, TP, TP, dtype, timeout=300)
