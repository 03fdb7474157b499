"""Checkpoints: save at one layout, load at others and into the dense model, bitwise."""

import os

import pytest
import torch

from parallelkit import mpu
from parallelkit.checkpoint import (CheckpointDamagedError, CheckpointMismatchError,
                                    full_state_dict, load_checkpoint, save_checkpoint)
from parallelkit.parallelize import parallelize
from parallelkit.testing import run_on_ranks
from parallelkit.models.tinylm import TinyConfig, TinyLM

CONFIG = TinyConfig(vocab=64, layers=2)  # two blocks: one per pipeline stage


def model_and_optimizer(tp):
    mpu.initialize(tp=tp)
    torch.manual_seed(0)
    model = parallelize(TinyLM(CONFIG), sequence_parallel=False)
    # eps=1e-6 rather than 1e-8: the key biases' true gradient is 0 (softmax ignores a
    # per-query constant), so theirs is rounding noise that a tiny eps would blow up to a full
    # Adam step, and the cross-layout comparison below would compare noise.
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6)


def train_step(model, optimizer, seed):
    g = torch.Generator().manual_seed(seed)
    ids, targets = (torch.randint(0, 64, (8, 2), generator=g) for _ in range(2))
    model.loss(ids, targets).backward()
    optimizer.step()
    optimizer.zero_grad()


def full_optimizer_state(model, optimizer):
    """exp_avg / exp_avg_sq at full size (gathered like the parameters), by parameter name."""
    held = [p for group in optimizer.param_groups for p in group["params"]]
    saved = {}
    for key in ("exp_avg", "exp_avg_sq"):
        originals = {p: p.data for p in held}
        for p in held:
            p.data = optimizer.state[p][key]
        saved.update({f"{n}.{key}": t for n, t in full_state_dict(model, optimizer).items()})
        for p, data in originals.items():
            p.data = data
    return saved


def _save(path, tp):
    model, optimizer = model_and_optimizer(tp)
    train_step(model, optimizer, seed=1)
    save_checkpoint(path, model, optimizer)
    reference = full_state_dict(model), full_optimizer_state(model, optimizer)
    train_step(model, optimizer, seed=2)  # the step a reloaded run must reproduce
    return reference, full_state_dict(model)


def _load(path, tp):
    model, optimizer = model_and_optimizer(tp)
    train_step(model, optimizer, seed=7)  # state to overwrite
    load_checkpoint(path, model, optimizer)
    loaded = full_state_dict(model), full_optimizer_state(model, optimizer)
    train_step(model, optimizer, seed=2)
    return loaded, full_state_dict(model)


def assert_equal(a, b, exact=True):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], list):
            assert a[key] == b[key], key
        elif exact:
            assert torch.equal(a[key], b[key]), key
        else:
            # Another layout sums matmul partials in another order; the key biases' gradient is
            # pure rounding noise (softmax ignores them), which Adam turns into a step of up to
            # lr * |g| / eps = 1e-2 * 1e-9 / 1e-6: 1e-5.
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=2e-5, msg=key)


def test_save_at_tp2_load_at_tp4_tp1_and_dense(tmp_path):
    path = str(tmp_path / "ckpt")
    (params, optim), after_step = run_on_ranks(_save, 4, path, 2)[0]
    assert os.path.isfile(os.path.join(path, ".metadata"))
    for tp in (2, 4, 1):
        (loaded_params, loaded_optim), loaded_after = run_on_ranks(_load, 4, path, tp)[0]
        assert_equal(loaded_params, params)
        assert_equal(loaded_optim, optim)
        # A step after loading equals the step without the round trip: bitwise at the same
        # layout, to rounding at another (matmuls split differently).
        assert_equal(loaded_after, after_step, exact=tp == 2)
    dense = TinyLM(CONFIG)
    load_checkpoint(path, dense)  # one process, no process group: the full tensors
    assert_equal({n: p.detach() for n, p in dense.named_parameters()}, params)


def _failing_save(path):
    model, optimizer = model_and_optimizer(2)
    import torch.distributed.checkpoint as dcp

    def broken_save(*args, **kwargs):  # writes everything, then fails (say, at the rename)
        original(*args, **kwargs)
        raise OSError("disk full")

    original, dcp.save = dcp.save, broken_save
    try:
        save_checkpoint(path, model, optimizer)
    except OSError:
        pass
    finally:
        dcp.save = original
    return full_state_dict(model)


def test_a_failed_save_is_recovered_with_a_warning_then_cleaned_up(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint at .* does not exist"):
        load_checkpoint(str(tmp_path / "nothing"), TinyLM(CONFIG))
    failed = str(tmp_path / "failed")
    params = run_on_ranks(_failing_save, 4, failed)[0]
    (staging,) = os.listdir(tmp_path)  # complete, but never renamed into place
    assert ".incomplete-" in staging
    dense = TinyLM(CONFIG)
    with pytest.warns(UserWarning, match=f"no complete checkpoint at '{failed}': a save was "
                                         f"interrupted; loading '.*{staging}'"):
        load_checkpoint(failed, dense)
    assert_equal({n: p.detach() for n, p in dense.named_parameters()}, params)
    run_on_ranks(_save, 4, failed, 2)  # the next save removes what the failed one left
    assert os.listdir(tmp_path) == ["failed"]


def _load_error(path, tp, vocab):
    """What each rank raises loading ``path`` into the model with ``vocab`` at ``tp``."""
    mpu.initialize(tp=tp)
    model = parallelize(TinyLM(TinyConfig(vocab=vocab, layers=2)), sequence_parallel=False)
    try:
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    except (CheckpointMismatchError, CheckpointDamagedError) as error:
        return f"{type(error).__name__}: {error}"


def test_every_rank_raises_the_same_named_error(tmp_path):
    path = str(tmp_path / "ckpt")
    run_on_ranks(_save, 4, path, 2)
    # Each rank holds half the vocab rows: the error still gives the full shapes.
    errors = run_on_ranks(_load_error, 4, path, 2, vocab=128)
    assert len(set(errors)) == 1, errors
    assert errors[0].startswith("CheckpointMismatchError")
    assert "'model.embed.weight' saved as (64, 32), expected (128, 32)" in errors[0]
    # The checksums are split over the ranks; the one that finds the damage tells the others.
    last = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[-1]
    with open(os.path.join(path, last), "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        f.write(b"\xff" * 64)
    errors = run_on_ranks(_load_error, 4, path, 2, vocab=64)
    assert len(set(errors)) == 1, errors
    assert errors[0].startswith("CheckpointDamagedError") and f"{last}' is corrupted" in errors[0]


def test_a_tensor_of_another_shape_is_named_with_both_full_shapes(tmp_path):
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, TinyLM(CONFIG))
    with pytest.raises(CheckpointMismatchError,
                       match=r"'model\.embed\.weight' saved as \(64, 32\), expected \(128, 32\)"
                             r".*different model config \(vocab size, hidden size"):
        load_checkpoint(path, TinyLM(TinyConfig(vocab=128, layers=2)))


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = str(tmp_path / "ckpt")
    save_checkpoint(path, TinyLM(CONFIG))  # no optimizer state
    model = TinyLM(CONFIG)
    with pytest.raises(CheckpointMismatchError,
                       match=r"lacks \d+ key\(s\) the model expects: 'optim\..*"
                             r"saved without an optimizer: load it with optimizer=None"):
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointMismatchError,
                       match=r"lacks \d+ key\(s\) the model expects: 'model\.blocks\.2\..*"
                             r"from another model"):
        load_checkpoint(path, TinyLM(TinyConfig(vocab=64, layers=3)))
    with pytest.raises(CheckpointMismatchError,
                       match=r"holds \d+ key\(s\) the model does not have: 'model\.blocks\.1\..*"
                             r"from another model"):
        load_checkpoint(path, TinyLM(TinyConfig(vocab=64, layers=1)))


def _pipeline_model(tp, pp):
    """TinyLM converted for TP, this rank's pipeline stage, AdamW over the stage."""
    from parallelkit.pipeline_parallel import PipelineStage

    mpu.initialize(tp=tp, pp=pp)
    torch.manual_seed(0)
    model = parallelize(TinyLM(CONFIG), sequence_parallel=False)
    stage = PipelineStage.from_layers(model.blocks, lambda logits, t: torch.nn.functional
                                      .cross_entropy(logits.flatten(0, 1), t.flatten()),
                                      pre=model.embed,
                                      post=torch.nn.Sequential(model.ln_f, model.lm_head))
    return model, stage, torch.optim.AdamW(stage.parameters(), lr=1e-2, eps=1e-6)


def _save_pipelined(path):
    from parallelkit.pipeline_parallel import train_step

    model, stage, optimizer = _pipeline_model(tp=2, pp=2)
    g = torch.Generator().manual_seed(3)
    ids, targets = (torch.randint(0, 64, (8, 2), generator=g) for _ in range(2))
    train_step("1f1b", stage, ids, targets, 2, (8, 1, 32))
    optimizer.step()
    save_checkpoint(path, model, optimizer)
    return full_state_dict(model, optimizer), full_optimizer_state(model, optimizer)


def _load_unpipelined(path, tp):
    model, optimizer = model_and_optimizer(tp)
    train_step(model, optimizer, seed=7)
    load_checkpoint(path, model, optimizer)
    return full_state_dict(model), full_optimizer_state(model, optimizer)


def test_save_at_tp2_pp2_load_at_tp4_pp1(tmp_path):
    path = str(tmp_path / "ckpt")
    params, optim = run_on_ranks(_save_pipelined, 4, path)[0]
    assert params.keys() == dict(TinyLM(CONFIG).named_parameters()).keys()  # every stage's part
    loaded_params, loaded_optim = run_on_ranks(_load_unpipelined, 4, path, 4)[0]
    assert_equal(loaded_params, params)
    assert_equal(loaded_optim, optim)
