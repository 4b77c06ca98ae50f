"""The kill -9 soak (benchmarks/soak_kills.py) in small: random kills never lose or duplicate a row."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from soak_kills import soak  # noqa: E402


def test_random_kills_lose_nothing_and_duplicate_nothing(tmp_path):
    result = soak(tmp_path, kills=4, n_images=64, batch_size=4, seed=1, log=lambda _: None)
    assert result.kills == 4
    assert result.ok, result.text()
    assert result.text() == "4 kills, 0 lost, 0 duplicated, store identical to an uninterrupted run"
