"""CI-sized runs of the soak scripts in tests/soak/ (the full-size figures are in the README):
garbage on every RPC, abandoned sessions, many clients at once, and volunteers and the
coordinator killed under load."""

from __future__ import annotations

import pytest
from soak import chaos, forged, fuzz, leak, load

pytestmark = pytest.mark.slow


def test_garbage_on_every_rpc_is_answered_and_costs_nothing() -> None:
    # (the suite's longest test at 150 a method, 1-2 min; the full-size run, 10,000 a
    # method, is in the README)
    per_method = 75
    result = fuzz.run(per_method=per_method, seed=1)
    for service, methods in result["codes"].items():
        expected = fuzz.NODE if service == "node" else fuzz.COORDINATOR
        assert set(methods) == set(expected)
        for method, codes in methods.items():
            assert sum(codes.values()) == per_method, (service, method)
            # a status for each (run() fails on a hang); never a crash of the handler
            assert "UNKNOWN" not in codes and "INTERNAL" not in codes, (service, method, codes)
    # garbage is refused as such, not passed on: most messages are invalid
    assert result["codes"]["node"]["Step"].get("INVALID_ARGUMENT", 0) > 0
    assert all(growth < 50 for growth in result["rss_growth_mb"].values()), result
    assert result["generation_after_equals_local"]


def test_forged_reports_exclude_no_one_in_a_live_swarm() -> None:
    result = forged.run(reports=300)
    assert sum(result["answers"].values()) == 300
    assert result["answers"].get("INVALID_ARGUMENT", 0) >= 1  # false evidence is refused
    assert result["excluded"] == [] and result["healthy"] == 3, result
    assert result["generation_unchanged"]
    assert result["rss_growth_after_first_three_mb"] < 20, result


def test_abandoned_sessions_are_freed_after_their_ttl() -> None:
    # The TTL is well over the time opening them all takes (about 1.5 s on a busy 2-core
    # machine), so all 150 are held at once before any expires.
    result = leak.run(sessions=150, ttl_s=6.0)
    assert result["held_sessions"] == 150 and result["held_kv_bytes"] > 0, result
    assert result["sessions_after_ttl"] == 0 and result["kv_bytes_after_ttl"] == 0
    assert result["rss_mb"]["after"] - result["rss_mb"]["baseline"] < 50, result


def test_many_clients_at_once_all_finish() -> None:
    result = load.run(clients=8, seconds=10, tokens=16)
    assert result["errors"] == [], result["errors"]
    assert result["generations"] >= 8 and result["tokens_per_s"] > 0
    assert result["token_latency_ms"]["p99"] >= result["token_latency_ms"]["p50"] > 0


def test_volunteers_killed_every_five_seconds_cost_no_token() -> None:
    result = chaos.run("nodes", seconds=20, min_kills=3)
    assert result["errors"] == [], result
    assert len(result["events"]) >= 3  # nodes really were killed (and started again) along the way
    assert result["completed"] == result["generations"] > 0
    assert result["equal_to_fault_free"] == result["generations"], result


def test_a_restarted_coordinator_loses_no_generation() -> None:
    result = chaos.run("coordinator", seconds=12)
    assert result["errors"] == [], result
    assert result["equal_to_fault_free"] == result["generations"] > 0
    # whole again within two heartbeat timeouts of the restart (nodes re-register by then)
    assert result["swarm_whole_again_s"] is not None and result["swarm_whole_again_s"] < 10
