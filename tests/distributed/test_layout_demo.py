"""The `python -m parallelkit layout` job: its proof on 8 ranks, its report, its argument checks."""

import pytest

from parallelkit.__main__ import main
from parallelkit.demos.layout import prove_groups, report
from parallelkit.testing import run_on_ranks


def test_report_on_8_ranks_says_ok():
    results = run_on_ranks(prove_groups, 8, 2, 2, 2, "tp-cp-dp-pp", timeout=120)
    text, ok = report(results)
    assert ok
    assert "     3  [2,3]  [3,7]  [3]  [1,3]  [1,3]  [2,3,6,7]  [0,1,2,3]  [3,7]" in text
    assert text.endswith("OK: every all-reduce reached exactly the ranks its group lists")


def test_report_flags_a_group_that_reached_other_ranks():
    results = run_on_ranks(prove_groups, 8, 1, 4, 1, "tp-cp-dp-pp", timeout=120)
    results[5]["seen"]["tp"] = [4, 5]  # as if rank 5's tp all-reduce had reached rank 4
    text, ok = report(results)
    assert not ok
    assert "[4,5]!" in text and text.endswith("reached other ranks than they list")


def test_bad_sizes_are_one_clear_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["layout", "--world", "8", "--tp", "3"])
    assert exited.value.code == 2
    assert "world_size=8 is not divisible by tp*pp*cp = 3*1*1 = 3" in capsys.readouterr().err


def test_dry_run_prints_the_map_without_processes(capsys):
    assert main(["layout", "--world", "16", "--tp", "2", "--pp", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[0,4,8,12] [1,5,9,13] [2,6,10,14] [3,7,11,15]" in out
    assert "embedding (first + last stage)  [0,12] [1,13] [2,14] [3,15]" in out
