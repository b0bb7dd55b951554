"""scripts/eval_diagnosis.py's account of a missed planted failure, and its spec options (no world built)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
eval_diagnosis = pytest.importorskip("eval_diagnosis")


def _table():
    # 40 rows: 10 small stars (the slice, loss 5), 10 large stars (loss 1), 20 small circles (loss 1)
    shape = ["star"] * 20 + ["circle"] * 20
    size = ["small"] * 10 + ["large"] * 10 + ["small"] * 20
    rows = pd.DataFrame({"shape": shape, "size": size, "color": "red", "background": "dark",
                         "slice_small_stars": [True] * 10 + [False] * 30},
                        index=[f"r{i}" for i in range(40)])
    loss = np.where(rows["slice_small_stars"], 5.0, 1.0)
    is_test = np.ones(40, bool)
    world = SimpleNamespace(slices=[{"name": "small stars", "column": "slice_small_stars"}])
    s = {"slice": "small stars", "where": {"shape": "star", "size": "small"}}
    return s, rows, loss, is_test, world


def _mode(desc, ids, shown=True, reason=None):
    return SimpleNamespace(description=desc, ids=ids, shown=shown, evidence={"reason": reason} if reason else {})


def test_why_a_slice_was_missed():
    s, rows, loss, is_test, world = _table()
    ids = list(rows.index)
    below = [_mode("a circle", ids[20:]), _mode("a large star", ids[10:20]), _mode("a small star", ids[:10])]
    why = eval_diagnosis.why_missed(s, below, 2, rows, loss, is_test, world)
    assert why.startswith("named at rank 3 (below the top 2): 'a small star' (")
    assert "most of its rows (10 of 10) are in 'a small star' (rank 3" in why
    hidden = [_mode("a circle", ids[20:]), _mode("a small star", ids[:8], shown=False, reason="fewer than 20")]
    why = eval_diagnosis.why_missed(s, hidden, 2, rows, loss, is_test, world)
    assert why.startswith("'a small star' hidden: fewer than 20")
    assert "(8 of 10) are in 'a small star' (rank 2, hidden" in why
    wrong = [_mode("a small red object", ids[:5] + ids[20:])]
    why = eval_diagnosis.why_missed(s, wrong, 3, rows, loss, is_test, world)
    assert why.startswith("most of its rows (5 of 10) are in 'a small red object' (rank 1; its words ")
    assert "20% of its members are the slice's" in why
    assert eval_diagnosis.why_missed(s, [_mode("a circle", ids[20:])], 3, rows, loss, is_test, world) == \
        "no mode holds its rows"
    assert eval_diagnosis.why_missed(s, [], 3, rows, loss, is_test, world).startswith("explain shows no mode")


def test_no_name_is_right_only_where_nothing_failed():
    s, rows, loss, is_test, world = _table()
    nothing = eval_diagnosis.judge([], rows, loss, is_test, [], 3)
    assert nothing["c2_every_name_a_true_failure"] and nothing["c1_every_slice_named"]
    missed = eval_diagnosis.judge([], rows, loss, is_test, [s], 3)
    assert not missed["c2_every_name_a_true_failure"] and not missed["c1_every_slice_named"]
    named = eval_diagnosis.judge([{"description": "a small star", "ids": list(rows.index[:10]) * 2}],
                                 rows, loss, is_test, [s], 3)
    assert named["named"] == {"small stars": "a small star"} and named["top"][0]["ratio"] == pytest.approx(
        5.0 / 2.0)  # the slice's rows' loss 5 over the mean (10 x 5 + 30 x 1) / 40


def test_list_prints_random_specs_and_the_shared_clip(capsys):
    assert eval_diagnosis.main(["--random", "2", "--seed", "5", "--list"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["world"] for x in lines] == ["random-5-0", "random-5-1"]
    assert all(x["spec"]["clip"] == {"shared": True} for x in lines)
    assert eval_diagnosis.main(["--specs", "default", "--shared-clip", "--list"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["spec"]["clip"]["shared"] is True and line["spec"]["seed"] == 0
