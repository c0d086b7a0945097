"""report.md shows what each pass did, and a training loss curve as a sparkline."""

from __future__ import annotations

from edgecomp.report import _pass_lines, loss_curve, sparkline


def test_sparkline_follows_the_curve() -> None:
    line = sparkline([4.0, 3.0, 2.0, 1.0, 1.0, 0.5])
    assert len(line) == 6 and line[0] == "█" and line[-1] == "▁"
    assert list(line) == sorted(line, reverse=True)  # a falling loss draws a falling line
    assert len(sparkline(list(range(1000)), width=60)) == 60


def test_pass_lines_name_the_counts_and_draw_the_training() -> None:
    record = {"pass": "prune-structured", "params_before": 1000, "params_after": 600, "seconds": 1.5,
              "recovery": {"loss_curve": [2.0, 1.0, 0.5]}}
    lines = _pass_lines(record)
    assert "params_before 1000, params_after 600" in lines[0]
    assert lines[1].endswith("0.5 (3 points)") and "`█▃▁`" in lines[1]
    assert _pass_lines({"pass": "quantize-dynamic", "per_channel": True}) == []


def test_an_iterative_pass_draws_its_rounds_end_to_end() -> None:
    """A pass that trains once per round records a list of training summaries: its curve is theirs in order."""
    rounds = [{"loss_curve": [3.0, 2.0]}, {"loss_curve": [2.5, 1.0]}]
    assert loss_curve({"pass": "prune-unstructured", "training": rounds}) == [3.0, 2.0, 2.5, 1.0]
    assert loss_curve({"pass": "prune-structured", "recovery": rounds}) == [3.0, 2.0, 2.5, 1.0]
    assert loss_curve({"pass": "distill", "loss_curve": [1.0], "training": rounds}) == [1.0]
    assert loss_curve({"pass": "quantize-dynamic"}) == []
    assert _pass_lines({"pass": "prune-unstructured", "sparsity": 0.5, "training": rounds})[1].endswith("(4 points)")
