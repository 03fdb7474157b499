"""benchmarks/gpu_check.py, the one command of a GPU machine, proven on CPU: its dry run end to
end (one .tgz holding every step's log, summary.json and the benchmarks' JSON and PNG), a step cut
off at its budget (its forked children too) with the tgz still written, and the GPU tests' order
that lets their ranks fork before pytest's process holds a CUDA context."""

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks import gpu_check
from benchmarks.gpu_check import Step, pack, run_all

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_packs_every_step_into_one_tgz(tmp_path):
    out = tmp_path / "gpu-check.tgz"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out",
                          str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert "DRY RUN on CPU" in run.stdout and "all steps ok" in run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu-check.tgz"]  # one file, no folder

    with tarfile.open(out) as tgz:
        names = tgz.getnames()
        folder = names[0]
        summary = json.load(tgz.extractfile(f"{folder}/summary.json"))
    assert folder.startswith("gpu-dry-run-cpu-") and all(n.startswith(folder) for n in names)
    files = {n.removeprefix(folder + "/") for n in names} - {folder}
    steps = {r["step"]: r for r in summary["steps"]}
    assert list(steps) == ["build", "info", "imports", "gpu-ranks", "gpu-kernels", "benchmarks"]
    assert {f"{name}.log" for name in steps if name != "build"} | {"summary.json"} <= files
    for name in ("norms", "cross_entropy"):
        assert {f"{name}-cpu-quick.json", f"{name}-cpu-quick.png"} <= files
    assert summary["dry_run"] and summary["ok"] and summary["files"] == len(files)
    assert steps["build"]["status"] == "skipped" and "dry run" in steps["build"]["detail"]
    assert all(r["status"] == "ok" for name, r in steps.items() if name != "build")
    assert "cuda_compiled" in steps["info"]["detail"]
    assert "imported" in steps["imports"]["detail"] and "FAILED" not in steps["imports"]["detail"]
    # The GPU tests are collected and skip here; the multi-rank ones in their own step.
    for name in ("gpu-ranks", "gpu-kernels"):
        assert "skipped" in steps[name]["detail"] and "passed" not in steps[name]["detail"]
    assert steps["benchmarks"]["detail"] == "wrote 2 JSON, 2 PNG"


def test_a_step_past_its_budget_is_stopped_with_its_children_and_the_rest_still_run(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    py = sys.executable
    child_pid = tmp_path / "child.pid"
    hang = (f"import pathlib, subprocess, time; child = subprocess.Popen(['sleep', '300']); "
            f"pathlib.Path({str(child_pid)!r}).write_text(str(child.pid)); print('started', "
            f"flush=True); time.sleep(300)")
    steps = [Step("hangs", [py, "-c", hang], 2.0),
             Step("left-out", [py, "-c", "pass"], 5.0, skip="not wanted here"),
             Step("after", [py, "-c", "print('1 passed in 0.01s')"], 30.0)]
    began = time.monotonic()
    records = list(run_all(steps, stage, stage, budget_s=120.0,
                           env=gpu_check.step_env(dry_run=True)))
    assert time.monotonic() - began < 30
    hung, left_out, after = records
    assert hung["status"] == "TIMEOUT" and hung["timed_out"]
    log = (stage / "hangs.log").read_text()
    assert "started" in log and "stopped after 2 s" in log
    assert left_out["status"] == "skipped" and left_out["detail"] == "not wanted here"
    assert after["status"] == "ok" and after["detail"] == "1 passed in 0.01s"
    assert not running(int(child_pid.read_text())), "the timed-out step's child outlived it"

    names = pack(stage, tmp_path / "out.tgz")
    assert {"stage/hangs.log", "stage/after.log"} <= set(names)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a killed one may linger as a zombie until reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_no_step_starts_without_time_for_it(tmp_path):
    steps = [Step("late", [sys.executable, "-c", "pass"], 60.0)]
    budget = gpu_check.PACKING_S + gpu_check.MIN_STEP_S - 1
    (record,) = run_all(steps, tmp_path, tmp_path, budget_s=budget, env={})
    assert record["status"] == "not run" and "left" in record["detail"]


def test_out_is_a_file_or_a_folder_to_name_one_in(tmp_path):
    assert gpu_check.resolve_out(tmp_path, "gpu-x-1") == tmp_path / "gpu-x-1.tgz"
    assert gpu_check.resolve_out(tmp_path / "a.tgz", "gpu-x-1") == tmp_path / "a.tgz"


def test_gpu_tests_that_fork_run_before_those_that_hold_cuda_whatever_the_paths_order():
    """Given the single-process GPU tests' folder first, the `forks` tests still come first."""
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                          "-p", "no:cacheprovider", "tests/ops",
                          "tests/distributed/test_gpu_single_device.py"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    ids = [line for line in run.stdout.splitlines() if "::" in line]
    forking = [i for i, node in enumerate(ids) if "test_gpu_single_device.py" in node]
    assert forking and ids[len(forking):] and forking == list(range(len(forking))), ids


def test_stopped_from_outside_it_still_writes_the_tgz(tmp_path):
    out = tmp_path / "stopped.tgz"
    run = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out",
                            str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    for line in run.stdout:  # stop it inside its first step that runs
        if line.startswith("[gpu_check] info:"):
            run.terminate()
            break
    run.communicate(timeout=120)
    assert run.returncode != 0
    with tarfile.open(out) as tgz:
        summary = json.load(tgz.extractfile(f"{tgz.getnames()[0]}/summary.json"))
    statuses = [r["status"] for r in summary["steps"]]
    assert statuses == ["skipped", "STOPPED", "not run", "not run", "not run", "not run"]
    assert not summary["ok"] and "stopped" in summary["steps"][1]["detail"]
