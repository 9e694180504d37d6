"""benchmarks/run.py: the goals table quotes every committed same-series pair, in order."""

from __future__ import annotations

import json
from pathlib import Path


def _write(folder: Path, name: str, rec: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps([rec]))


def test_pairs_in_measured_order_with_counts(tmp_path, monkeypatch, bench):
    run = bench("run")
    monkeypatch.setattr(run, "RES", tmp_path)
    base = {"model": "bert-base", "layers": 12, "seq_len": 128}
    # measured order differs from the folders' names; one folder lacks CrypTen, one is 4 layers
    _write(tmp_path / "series_b", "e2e_base_128.json", {**base, "wall_s": 8.0, "started_utc": "2026-01-01T01:00"})
    _write(tmp_path / "series_b", "crypten_bert_base_colmajor.json", {"wall_s": 40.0})
    _write(tmp_path / "series_b", "e2e_base_128_ahead.json", {**base, "wall_s": 6.0})
    _write(tmp_path / "series_a", "e2e_base_128.json", {**base, "wall_s": 9.0, "started_utc": "2026-01-01T02:00"})
    _write(tmp_path / "series_a", "crypten_bert_base_colmajor.json", {"wall_s": 30.0})
    _write(tmp_path / "series_c", "e2e_base_128.json", {**base, "wall_s": 1.0, "started_utc": "2026-01-01T03:00"})
    _write(tmp_path / "series_d", "e2e_base_128.json", {**base, "layers": 4, "wall_s": 1.0, "started_utc": "x"})
    _write(tmp_path / "series_d", "crypten_bert_base_colmajor.json", {"wall_s": 30.0})
    _write(tmp_path / "series_a", "e2e_base_128_fewer_rounds.json", {**base, "wall_s": 10.5})
    assert run.committed_pairs() == [("series_b", 8.0, 40.0, 6.0, None), ("series_a", 9.0, 30.0, None, 10.5)]
    (row,) = run.pairs_rows()
    assert "b: 0.200 / 0.150; a: 0.300 / fewer rounds 0.350 |" in row
    assert row.endswith("default: 1 of 2 met; ahead: 1 of 1 met; fewer_rounds: 0 of 1 met |")
    (tmp_path / "series_a" / "e2e_base_128.json").write_text("{not json")  # a broken folder is skipped
    assert [p[0] for p in run.committed_pairs()] == ["series_b"]
