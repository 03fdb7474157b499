"""check-plan: a shrunken model converted on local ranks, its loss and every gradient against the
unconverted model; exit 0 match, 1 differ, 2 conversion refused."""

import json
import os
import subprocess
import sys

import pytest
import transformers

from parallelkit.__main__ import main
from parallelkit.check_plan import Row, _fold, check_plan
from parallelkit.models.shrink import build_model, shrink_config
from parallelkit.models.decoder import structural_plan
from parallelkit.parallel_styles import ColwiseParallel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_config(tmp_path, config) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    return str(path)


def llama_8b_shape(**extra):
    """Llama-3-8B's sizes (shrunk by check-plan before anything is built)."""
    sizes = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 bos_token_id=128000, eos_token_id=128001, architectures=["LlamaForCausalLM"])
    return transformers.LlamaConfig(**{**sizes, **extra})


@pytest.mark.parametrize("options", [[], ["--no-sequence-parallel"]])
def test_llama_plan_passes_through_the_command_line(tmp_path, options):
    path = write_config(tmp_path, llama_8b_shape())
    run = subprocess.run([sys.executable, "-m", "parallelkit", "check-plan", path, "--tp", "2",
                          "--cp", "2", *options], cwd=REPO, capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "max |diff|" in run.stdout and "model.layers.1.mlp.down_proj.weight" in run.stdout
    assert "plan OK: 21 gradients and the loss match the unconverted model at tp=2, cp=2" in \
        run.stdout
    if options:
        assert "sequence_parallel=False, overlap_comm=False" in run.stdout


FUNCTION_CASES = {
    # per-head q/k RMSNorms over the head dim: their gradients are partial sums over TP
    "qwen3": transformers.Qwen3Config(num_attention_heads=16, num_key_value_heads=8,
                                      head_dim=128, architectures=["Qwen3ForCausalLM"]),
    # RMSNorm scales by (1 + w.float()) in float32 whatever the dtype; tied LM head
    "gemma": transformers.GemmaConfig(architectures=["GemmaForCausalLM"]),
}


@pytest.mark.parametrize("name", sorted(FUNCTION_CASES))
def test_family_plan_passes_through_the_function(name):
    report = check_plan(FUNCTION_CASES[name].to_dict(), tp=2)
    assert report.exit_code == 0, report.format()
    assert report.rows[0].name == "loss" and all(row.ok for row in report.rows)
    assert len(report.rows) == 1 + len(dict(build_model(
        shrink_config(FUNCTION_CASES[name], 2, 16)).named_parameters()))


# Architectures with no family file, converted by the structural plan at tp=2 x cp=2 with the
# defaults (sequence parallelism, fused overlap, vocab-parallel loss).
STRUCTURAL_CASES = {
    # attention out projection "dense", plain fc1/fc2 MLP, partial rotary, LayerNorm with bias
    "phi": transformers.PhiConfig(architectures=["PhiForCausalLM"]),
    # GPT-2 style MLP names c_fc / c_proj with biases
    "starcoder2": transformers.Starcoder2Config(architectures=["Starcoder2ForCausalLM"]),
    # a fused [gate | up] projection, split part by part
    "glm": transformers.GlmConfig(architectures=["GlmForCausalLM"]),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL_CASES))
def test_the_structural_plan_passes_beyond_the_families(name):
    report = check_plan(STRUCTURAL_CASES[name].to_dict(), tp=2, cp=2)
    assert report.exit_code == 0, report.format()
    assert report.options["sequence_parallel"] and report.options["overlap_comm"]


def up_paired_wrongly(model):
    """The Llama plan with up_proj split as if it were a fused [gate | up]: rank r's up rows no
    longer match its gate rows."""
    plan = structural_plan(model)
    plan[next(p for p in plan if p.endswith("up_proj"))] = ColwiseParallel(parts=2)
    return plan


def test_a_broken_plan_fails_naming_the_parameters():
    report = check_plan(llama_8b_shape(), tp=2, plan=up_paired_wrongly,
                        sequence_parallel=False)
    assert report.exit_code == 1
    failed = {row.name for row in report.failures}
    assert {"loss", "model.layers.0.mlp.up_proj.weight"} <= failed
    assert f"plan FAILS: {len(failed)} of {len(report.rows)} differ" in report.format()


def test_kv_heads_not_dividing_tp_is_a_conversion_error(tmp_path, capsys):
    # Counts that do not divide tp are kept as they are, so parallelize names the real ones.
    path = write_config(tmp_path, llama_8b_shape(num_key_value_heads=1))
    assert main(["check-plan", path, "--tp", "2"]) == 2
    out = capsys.readouterr().out
    assert "plan cannot be applied at tp=2, cp=1" in out
    assert "LlamaForCausalLM has 1 key/value heads, not divisible by tp=2" in out
    assert "Traceback" not in out


def test_bad_usage_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["check-plan", str(tmp_path / "missing.json"), "--tp", "2"])
    assert exit_.value.code == 2
    assert "cannot read the config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["check-plan", write_config(tmp_path, llama_8b_shape()), "--tp", "2",
              "--plan", "no_such_module:plan"])
    assert "No module named 'no_such_module'" in capsys.readouterr().err


def test_shrinking_keeps_the_structure():
    gqa = shrink_config(llama_8b_shape(tie_word_embeddings=True, attention_bias=True), 4, 32)
    assert (gqa.num_attention_heads, gqa.num_key_value_heads, gqa.head_dim) == (16, 4, 16)
    assert (gqa.hidden_size, gqa.num_hidden_layers, gqa.vocab_size) == (256, 2, 128)
    assert gqa.tie_word_embeddings and gqa.attention_bias and gqa._attn_implementation == "sdpa"
    assert (gqa.bos_token_id, gqa.eos_token_id) == (128000 % 128, 128001 % 128)
    gpt2 = shrink_config(transformers.GPT2Config(), 2, 16)  # n_head / n_embd / n_layer names
    assert (gpt2.n_head, gpt2.n_embd, gpt2.n_layer, gpt2.resid_pdrop) == (2, 32, 2, 0.0)
    qwen3 = shrink_config(transformers.Qwen3Config(), 2, 16)
    assert qwen3.layer_types == ["full_attention"] * 2
    longrope = transformers.Phi3Config(
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 48,
                         "long_factor": [2.0] * 48, "partial_rotary_factor": 1.0},
        original_max_position_embeddings=4096, max_position_embeddings=131072)
    assert len(shrink_config(longrope, 2, 16).rope_parameters["short_factor"]) == 16 // 2
    mqa = shrink_config(llama_8b_shape(num_key_value_heads=1), 2, 16)
    assert (mqa.num_attention_heads, mqa.num_key_value_heads) == (32, 1)


def test_a_difference_on_one_rank_fails_the_row():
    ok, bad = Row("w", (4,), 1e-17, 1e-15, True), Row("w", (4,), 0.5, 1e-15, False)
    loss = Row("loss", (), 0.0, 1e-13, True)
    folded_loss, folded = _fold([[loss, ok], [loss, bad]])
    assert folded_loss.ok and not folded.ok
    assert folded.max_diff == 0.5 and "rank(s) [1]" in folded.note
