"""The latency protocol: several runners are measured in alternating rounds, each on its own input."""

from __future__ import annotations

import time

import numpy as np

from edgecomp.bench import interleaved


class _Recorder:
    """A runner that logs which input it was given, in call order."""

    def __init__(self, name: str, seconds: float, log: list[str]) -> None:
        self.name, self.seconds, self.log = name, seconds, log

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.log.append(f"{self.name}:{int(feed['x'][0])}")
        time.sleep(self.seconds)
        return {"y": feed["x"]}


def test_rounds_alternate_and_each_runner_gets_its_feed() -> None:
    log: list[str] = []
    settings = {"warmup": 1, "runs": 12, "min_seconds": 0.0}
    a, b = _Recorder("a", 0.001, log), _Recorder("b", 0.003, log)
    lats = interleaved([(a, settings), (b, settings)], [{"x": np.array([1])}, {"x": np.array([2])}], rounds=4)
    assert set(log) == {"a:1", "b:2"}  # never the other runner's input
    timed = log[2:]  # after one warm-up call each
    switches = sum(1 for x, y in zip(timed, timed[1:]) if x != y)
    assert switches == 2 * 4 - 1  # a-block, b-block, four times over
    assert [lat["runs"] for lat in lats] == [12, 12] and all(lat["rounds"] == 4 for lat in lats)


def test_a_list_of_inputs_is_cycled_through() -> None:
    """An input-dependent runner (a graph that trims padding) is timed over every input, in turn."""
    log: list[str] = []
    settings = {"warmup": 0, "runs": 9, "min_seconds": 0.0}
    a = _Recorder("a", 0.0, log)
    cycle = [{"x": np.array([i])} for i in range(3)]
    lats = interleaved([(a, settings)], [cycle], rounds=1)
    assert log[:3] == ["a:0", "a:1", "a:2"]  # warm-up: every input once
    assert log[3:] == [f"a:{i % 3}" for i in range(9)] and lats[0]["runs"] == 9
