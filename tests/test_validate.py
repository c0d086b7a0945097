"""Parity metrics and the verdict, on hand-made arrays whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgecomp.validate import parity, run_all, verdict


def _feeds(name: str, rows: list[list[float]]) -> list[dict[str, np.ndarray]]:
    """One feed per row, each with a batch axis of 1 (how the pipeline stores outputs)."""
    return [{name: np.array([r], dtype=np.float32)} for r in rows]


def test_identical_outputs_are_exact() -> None:
    ref = _feeds("y", [[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]])
    m = parity(ref, ref)["outputs"]["y"]
    assert m["max_abs"] == 0.0 and m["mean_abs"] == 0.0
    assert m["cosine_mean"] == pytest.approx(1.0) and m["cosine_min"] == pytest.approx(1.0)
    assert m["sqnr_db"] == math.inf
    assert "top1_agreement" not in m  # not a classifier


def test_cosine_abs_error_and_sqnr_match_hand_computation() -> None:
    # sample 0: [3, 4] vs [4, 3] -> cos = 24/25, |diff| = [1, 1]; sample 1 identical.
    ref = _feeds("y", [[3.0, 4.0], [1.0, 0.0]])
    got = _feeds("y", [[4.0, 3.0], [1.0, 0.0]])
    par = parity(ref, got)
    m = par["outputs"]["y"]
    assert par["samples"] == 2
    assert m["max_abs"] == pytest.approx(1.0)
    assert m["mean_abs"] == pytest.approx(0.5)  # |diff| = [1, 1, 0, 0]
    assert m["cosine_min"] == pytest.approx(0.96)
    assert m["cosine_mean"] == pytest.approx(0.98)
    assert m["sqnr_db"] == pytest.approx(10 * math.log10(26 / 2))  # signal 25 + 1, noise 1 + 1


def test_zero_vectors_cosine() -> None:
    both_zero = parity(_feeds("y", [[0.0, 0.0]]), _feeds("y", [[0.0, 0.0]]))["outputs"]["y"]
    assert both_zero["cosine_mean"] == 1.0
    one_zero = parity(_feeds("y", [[1.0, 2.0]]), _feeds("y", [[0.0, 0.0]]))["outputs"]["y"]
    assert one_zero["cosine_mean"] == 0.0


def test_classification_top1_and_accuracy() -> None:
    # reference argmax: 0, 1, 2, 1; artifact argmax: 0, 1, 1, 1; labels: 0, 1, 2, 2
    ref = _feeds("logits", [[9, 0, 0], [0, 9, 0], [0, 0, 9], [0, 9, 1]])
    got = _feeds("logits", [[9, 0, 0], [0, 9, 0], [0, 5, 4], [0, 9, 1]])
    labels = np.array([0, 1, 2, 2])
    m = parity(ref, got, task="classification", labels=labels)["outputs"]["logits"]
    assert m["top1_agreement"] == pytest.approx(0.75)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["reference_accuracy"] == pytest.approx(0.75)
    assert m["accuracy_drop"] == pytest.approx(0.25)
    no_labels = parity(ref, got, task="classification")["outputs"]["logits"]
    assert no_labels["top1_agreement"] == pytest.approx(0.75) and "accuracy" not in no_labels


def test_runtime_output_with_other_layout_is_reshaped_to_reference() -> None:
    """A runtime may return [1, 4] as [4] or [1, 1, 4]; parity compares values, not layouts."""
    ref = [{"y": np.arange(4, dtype=np.float32).reshape(1, 4)}]
    got = [{"y": np.arange(4, dtype=np.float32).reshape(1, 1, 4) + 0.25}]
    m = parity(ref, got)["outputs"]["y"]
    assert m["max_abs"] == pytest.approx(0.25) and m["mean_abs"] == pytest.approx(0.25)


def test_missing_output_is_named() -> None:
    with pytest.raises(KeyError, match="embedding"):
        parity(_feeds("embedding", [[1.0]]), _feeds("other", [[1.0]]))


def test_run_all_calls_the_runner_once_per_feed() -> None:
    calls = []

    def runner(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(feed)
        return {"y": feed["x"] * 2}

    feeds = _feeds("x", [[1.0], [2.0], [3.0]])
    outs = run_all(runner, feeds)
    assert len(calls) == 3 and [float(o["y"][0, 0]) for o in outs] == [2.0, 4.0, 6.0]


def _par(**outputs: dict[str, float]) -> dict:
    return {"samples": 1, "outputs": outputs}


def test_verdict_lower_is_better_keys() -> None:
    par = _par(y={"max_abs": 2e-4, "mean_abs": 1e-5, "cosine_mean": 1.0})
    v = verdict(par, {"max_abs": 1e-4, "mean_abs": 1e-4})
    assert not v["ok"]
    checks = {c["metric"]: c for c in v["checks"]}
    assert checks["max_abs"]["ok"] is False and checks["max_abs"]["op"] == "<="
    assert checks["max_abs"]["value"] == pytest.approx(2e-4) and checks["max_abs"]["limit"] == pytest.approx(1e-4)
    assert checks["mean_abs"]["ok"] is True
    assert verdict(_par(y={"max_abs": 1e-4}), {"max_abs": 1e-4})["ok"]  # the limit itself passes


def test_verdict_higher_is_better_keys() -> None:
    v = verdict(_par(y={"cosine_mean": 0.995, "cosine_min": 0.97}), {"cosine_mean": 0.99, "cosine_min": 0.98})
    checks = {c["metric"]: c for c in v["checks"]}
    assert checks["cosine_mean"]["ok"] is True and checks["cosine_mean"]["op"] == ">="
    assert checks["cosine_min"]["ok"] is False
    assert v["ok"] is False
    assert verdict(_par(y={"cosine_mean": 0.99}), {"cosine_mean": 0.99})["ok"]


def test_verdict_takes_the_worst_output() -> None:
    par = _par(a={"max_abs": 1e-6, "cosine_mean": 0.999}, b={"max_abs": 5e-3, "cosine_mean": 0.95})
    v = verdict(par, {"max_abs": 1e-3, "cosine_mean": 0.99})
    checks = {c["metric"]: c for c in v["checks"]}
    assert checks["max_abs"]["value"] == pytest.approx(5e-3) and not checks["max_abs"]["ok"]
    assert checks["cosine_mean"]["value"] == pytest.approx(0.95) and not checks["cosine_mean"]["ok"]


def test_verdict_lists_keys_a_model_cannot_have_as_not_applicable() -> None:
    """An embedding model has no top-1; without a latency measurement there is no latency ratio."""
    v = verdict(_par(y={"cosine_mean": 0.999}), {"cosine_mean": 0.99, "top1_agreement": 0.99, "latency_ratio": 1.0})
    assert v["ok"] is True
    assert sorted(v["not_applicable"]) == ["latency_ratio", "top1_agreement"]
    assert [c["metric"] for c in v["checks"]] == ["cosine_mean"]


def test_verdict_latency_ratio_is_checked_when_measured() -> None:
    par = _par(y={"cosine_mean": 1.0})
    assert verdict(par, {"latency_ratio": 1.0}, latency_ratio=0.5)["ok"] is True
    slow = verdict(par, {"latency_ratio": 1.0}, latency_ratio=1.5)
    assert slow["ok"] is False and slow["checks"][0]["metric"] == "latency_ratio" and slow["not_applicable"] == []
