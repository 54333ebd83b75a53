"""The selection rule of benchmarks/selection.py: the lowest mean among the candidates whose
worst family is within the guard, and a real (tiny) screen through family_vs_adam."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import selection  # noqa: E402


def test_the_guard_excludes_a_candidate_whose_mean_hides_a_lost_family():
    scores = {"a": {"x": -0.30, "y": -0.05, "z": 0.00},
              "b": {"x": -0.30, "y": -0.05, "z": 0.01},
              "c": {"x": +0.20, "y": +0.04, "z": 0.00}}  # x: best mean, but 20% behind Adam on c
    verdict = selection.decide(scores, guard=0.05)
    assert verdict["chosen"] == "y"
    assert not verdict["candidates"]["x"]["eligible"] and verdict["candidates"]["x"]["worst_family"] == "c"
    assert verdict["candidates"]["y"]["mean"] == pytest.approx(-0.02)
    assert selection.decide(scores, guard=0.02)["chosen"] == "z"  # y's +0.04 now breaks the guard
    assert selection.decide(scores, guard=0.005)["chosen"] is None


def test_a_tiny_screen_writes_scores_and_a_verdict(tmp_path):
    out = tmp_path / "sel.json"
    selection.main(["--weights", ",@3e-4", "--families", "teacher_student", "--tasks", "1", "--steps", "20",
                    "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["scores"]["teacher_student"]) == {"default", "@3e-4"}
    assert res["chosen"] in (None, "default", "@3e-4")
    row = res["families"]["teacher_student"]["tasks"][0]
    assert row["adam_1e-3"]["valid"] > 0
