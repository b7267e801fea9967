"""mDNS across a simulated LAN: a coordinator advertised in one network namespace is
found from two others through a bridge. Needs root and iproute2; all traffic stays
inside namespaces this test makes (see tests/netns.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from netns import SimulatedLan, unavailable

from nanoshard import PROTOCOL_VERSION

pytestmark = [pytest.mark.netns, pytest.mark.slow]

_REASON = unavailable()

ADVERTISE = textwrap.dedent(
    """
    import sys, time
    from nanoshard import discovery as d
    swarm, host = sys.argv[1], sys.argv[2]
    props = d.coordinator_properties("coord-" + swarm[:8], swarm)
    advert = d.Advert("coordinator", "coord-" + swarm[:8], host, 50051, props)
    with d.Advertiser(advert, mdns_interfaces=[host]):
        print("ready", flush=True)
        sys.stdin.read()  # advertise until the test closes our stdin
    """
)

FIND = textwrap.dedent(
    """
    import json, sys, time
    from nanoshard import discovery as d
    swarm, host = sys.argv[1], sys.argv[2]
    t0 = time.monotonic()
    found = d.find_coordinator([host], timeout_s=10.0, swarm=swarm)
    print(json.dumps({
        "seconds": time.monotonic() - t0,
        "found": None if found is None else
            {"name": found.name, "target": found.target, "properties": found.properties},
    }), flush=True)
    """
)


def _root_links() -> str:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    return "\n".join(line.split(":")[1] for line in out.stdout.splitlines())


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
def test_lan_touches_no_root_namespace_and_is_removed_on_failure() -> None:
    links = _root_links()
    with pytest.raises(RuntimeError, match="boom"), SimulatedLan(hosts=2) as lan:
        assert _root_links() == links  # nothing added to the root namespace
        assert lan.bridge_ns in _namespaces()
        done = lan.run(1, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"])
        assert f"{lan.hosts[1].address}/24" in done.stdout
        raise RuntimeError("boom")
    assert lan.suffix not in _namespaces()
    assert _root_links() == links


@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
def test_coordinator_found_across_bridge() -> None:
    swarm = uuid.uuid4().hex
    with SimulatedLan(hosts=3) as lan:
        coord = lan.hosts[0]
        adv = lan.popen(
            0,
            [sys.executable, "-c", ADVERTISE, swarm, coord.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert adv.stdout is not None and adv.stdin is not None
        assert adv.stdout.readline().strip() == "ready", "advertiser did not start"

        finders = [
            lan.popen(
                i,
                [sys.executable, "-c", FIND, swarm, lan.hosts[i].address],
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in (1, 2)
        ]
        t0 = time.monotonic()
        results = []
        for proc in finders:
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, out
            results.append(json.loads(out))
        for result in results:
            found = result["found"]
            assert found is not None, f"coordinator not found across the bridge: {result}"
            assert found["target"] == f"{coord.address}:50051"
            assert found["properties"]["swarm"] == swarm
            assert found["properties"]["proto"] == str(PROTOCOL_VERSION)
            assert result["seconds"] < 5, result
        assert time.monotonic() - t0 < 25
        adv.stdin.close()
        assert adv.wait(timeout=10) == 0
    assert lan.suffix not in _namespaces()
