"""The bounded load test (benchmarks/load.py) on loopback: hundreds of submits and thousands of status polls from
many clients; nothing lost, wrong or run twice, no 5xx, and the server healthy after it. Throughput and p99 are
reported in its JSON, not asserted (speed goals belong to benchmarks, not unit tests)."""

from __future__ import annotations

import json

from benchmarks import load


def test_load_loses_nothing_duplicates_nothing_and_never_answers_5xx(tiny_weights, tmp_path):
    out = tmp_path / "load.json"
    assert load.main(["--clients", "20", "--requests", "200", "--weights", str(tiny_weights), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    r = report["results"]
    assert r["accepted"] == r["completed"] == 200
    assert r["lost"] == r["wrong"] == r["duplicated_ids"] == r["duplicated_runs"] == 0
    assert r["steps_run"] == r["steps_needed"] > 0  # the model ran each request's steps once, no more
    assert r["server_errors_5xx"] == r["unexpected_statuses"] == 0
    assert r["status_calls"] >= 1000
    assert r["healthy_after"] and report["ok"]
    assert (tmp_path / "load.md").read_text().count("|") > 20
