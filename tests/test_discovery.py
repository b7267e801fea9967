"""Discovery over real mDNS on loopback: adverts in this process, browsers in another.

Every zeroconf instance here is bound to 127.0.0.1 (never all interfaces: this machine
has a real outside network). Each test uses a random swarm id and filters on it, so two
test runs on the same machine cannot confuse each other.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from swarm import Swarm
from zeroconf import InterfaceChoice, ServiceBrowser, Zeroconf

from nanoshard import discovery as d
from nanoshard.errors import FailedPrecondition, InvalidArgument

LOOPBACK = ["127.0.0.1"]

# A browser process: prints one JSON line per change it sees, until its stdin closes.
WATCH = textwrap.dedent(
    """
    import json, logging, sys, threading
    from nanoshard import discovery as d
    logging.basicConfig(level=logging.DEBUG, format="watcher %(relativeCreated)d %(message)s")
    logging.getLogger("zeroconf").setLevel(logging.INFO)
    printing = threading.Lock()  # (the two watchers call back on threads of their own)

    def show(kind):
        def on_change(name, found):
            row = {"kind": kind, "name": name, "found": None}
            if found is not None:
                row["found"] = {"addresses": list(found.addresses), "port": found.port,
                                "properties": found.properties}
            with printing:
                print(json.dumps(row), flush=True)
        return on_change

    with d.Watcher(d.NODE_SERVICE, ["127.0.0.1"], show("node")), \\
            d.Watcher(d.COORD_SERVICE, ["127.0.0.1"], show("coordinator")):
        with printing:
            print(json.dumps({"ready": True}), flush=True)
        sys.stdin.read()
    """
)

# A finder process: runs the queries given as JSON and prints one JSON line per query.
FIND = textwrap.dedent(
    """
    import json, sys, time
    from nanoshard import discovery as d
    for q in json.loads(sys.argv[1]):
        t0 = time.monotonic()
        if q["op"] == "find":
            f = d.find_coordinator(["127.0.0.1"], q["timeout"], q["swarm"])
            names = [] if f is None else [f.name]
        elif q["op"] == "others":
            names = d.other_swarms(q["swarm"], ["127.0.0.1"], q["timeout"])
        else:
            swarms = set(q["swarms"])
            found = d.browse(d.COORD_SERVICE, q["timeout"], ["127.0.0.1"], want=q["want"],
                             match=lambda f: f.properties.get("swarm") in swarms)
            names = [f.name for f in found]
        print(json.dumps({"names": names, "seconds": time.monotonic() - t0}), flush=True)
    """
)


class Lines:
    """JSON lines from a child process, read on a thread so waits can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.seen: list[Any] = []
        self._queue: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def expect(self, pred: Callable[[Any], bool], timeout_s: float = 10.0) -> Any:
        """The first row, already seen or still to come, that ``pred`` accepts."""
        for row in self.seen:
            if pred(row):
                return row
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                row = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if row is None:
                pytest.fail(f"child exited; it printed {self.seen}")
            self.seen.append(row)
            if pred(row):
                return row
        pytest.fail(f"not seen within {timeout_s} s; child printed {self.seen}")


def advertise(*adverts: d.Advert) -> list[d.Advertiser]:
    """Register in parallel: each registration spends ~1.5 s probing the name."""
    with ThreadPoolExecutor(len(adverts)) as pool:
        return list(pool.map(lambda a: d.Advertiser(a, LOOPBACK), adverts))


@pytest.fixture
def swarm() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def watcher() -> Iterator[Lines]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCH], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    lines = Lines(proc)
    try:
        lines.expect(lambda r: r.get("ready"), timeout_s=20)
        yield lines
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- cross-process


@pytest.mark.slow
def test_adverts_seen_updated_and_gone_in_another_process(swarm: str, watcher: Lines) -> None:
    node_id = uuid.uuid4().hex
    node_props = d.node_properties(node_id, swarm, "cpu", 3_000_000_000, 41.5)
    coord_props = d.coordinator_properties(uuid.uuid4().hex, swarm)
    node_ad = d.Advert("node", f"node-{node_id[:8]}", "127.0.0.1", 50111, node_props)
    coord_ad = d.Advert("coordinator", f"coord-{swarm[:8]}", "127.0.0.1", 50110, coord_props)
    node, coord = advertise(node_ad, coord_ad)
    try:
        row = watcher.expect(lambda r: r.get("name") == node_ad.name and r["found"])
        assert row == {
            "kind": "node",
            "name": node_ad.name,
            "found": {"addresses": ["127.0.0.1"], "port": 50111, "properties": node_props},
        }
        row = watcher.expect(lambda r: r.get("name") == coord_ad.name and r["found"])
        assert row["kind"] == "coordinator"
        assert row["found"]["properties"] == coord_props
        assert row["found"]["port"] == 50110

        # A stage change republishes TXT; untouched keys survive the merge.
        node.update({"stage": d.stage_txt((1, 5)), "mem": "123"})
        row = watcher.expect(
            lambda r: (
                r.get("name") == node_ad.name
                and r["found"]
                and r["found"]["properties"]["stage"] == "1-5"
            )
        )
        assert row["found"]["properties"] == {**node_props, "stage": "1-5", "mem": "123"}

        # Graceful leave: the goodbye reaches the browser, long before any TTL (minutes).
        t0 = time.monotonic()
        node.close()
        watcher.expect(lambda r: r.get("name") == node_ad.name and r["found"] is None, timeout_s=15)
        assert time.monotonic() - t0 < 15
        with pytest.raises(FailedPrecondition):
            node.update({"stage": "0-1"})
    finally:
        node.close()
        coord.close()


@pytest.mark.slow
def test_a_search_stops_when_told_not_at_its_timeout(swarm: str) -> None:
    """A client interrupted (Ctrl-C) while it looks for a coordinator stops its search at
    once, not when the search would have given up."""
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    assert d.find_coordinator(LOOPBACK, timeout_s=30.0, swarm=swarm, stop=stop) is None
    assert time.monotonic() - started < 15.0  # (the timeout is 30 s: it stopped on the event)


def test_find_coordinator_filters_by_swarm_and_protocol(swarm: str) -> None:
    other, old = uuid.uuid4().hex, uuid.uuid4().hex
    mine = d.Advert(
        "coordinator", f"c-{swarm[:8]}", "127.0.0.1", 50120, d.coordinator_properties("a", swarm)
    )
    theirs = d.Advert(
        "coordinator", f"c-{other[:8]}", "127.0.0.1", 50121, d.coordinator_properties("b", other)
    )
    # Same swarm, newer protocol: must never be picked by this version.
    future = d.Advert(
        "coordinator",
        f"c-{old[:8]}",
        "127.0.0.1",
        50122,
        {**d.coordinator_properties("c", old), "proto": str(d.PROTOCOL_VERSION + 1)},
    )
    ads = advertise(mine, theirs, future)
    try:
        # Finds that succeed have a long timeout (they return when found: the assertion is
        # that they took far less, which holds on a busy machine too); those that cannot
        # succeed have a short one.
        queries = [
            {"op": "find", "swarm": swarm, "timeout": 30.0},
            {"op": "find", "swarm": other, "timeout": 30.0},
            {"op": "find", "swarm": old, "timeout": 1.0},
            {"op": "find", "swarm": uuid.uuid4().hex, "timeout": 0.5},
            {"op": "browse", "swarms": [swarm, other], "want": 2, "timeout": 30.0},
            {"op": "others", "swarm": swarm, "timeout": 5.0},  # (what join says it saw)
        ]
        out = subprocess.run(
            [sys.executable, "-c", FIND, json.dumps(queries)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        mine_r, theirs_r, future_r, absent_r, both_r, others_r = map(
            json.loads, out.stdout.splitlines()
        )
        assert mine_r["names"] == [mine.name]
        assert mine_r["seconds"] < 10  # returns as soon as it is found, not at the timeout
        assert theirs_r["names"] == [theirs.name]
        assert future_r["names"] == []
        assert absent_r["names"] == []
        assert absent_r["seconds"] < 0.5 + 2.0  # a timeout returns promptly
        assert both_r["names"] == sorted([mine.name, theirs.name])
        assert both_r["seconds"] < 10
        # (other tests' swarms may answer too: only these three are known)
        assert other in others_r["names"] and not {swarm, old} & set(others_r["names"])
    finally:
        for ad in ads:
            ad.close()


# ----------------------------------------------------------------------------- in-process


def test_zeroconf_interfaces_maps_cli_values() -> None:
    assert d.zeroconf_interfaces(None) is InterfaceChoice.All
    assert d.zeroconf_interfaces([]) is InterfaceChoice.All
    assert d.zeroconf_interfaces(["127.0.0.1"]) == ["127.0.0.1"]
    assert d.zeroconf_interfaces(["lo"]) == ["127.0.0.1"]
    assert d.zeroconf_interfaces(["127.0.0.1", "lo"]) == ["127.0.0.1"]
    with pytest.raises(InvalidArgument, match="no local interface"):
        d.zeroconf_interfaces(["203.0.113.77"])  # TEST-NET-3: never local
    with pytest.raises(InvalidArgument, match="interface name"):
        d.zeroconf_interfaces(["no-such-if0"])


def test_advertised_addresses() -> None:
    # A server bound to one address is advertised there, whatever mDNS is bound to.
    assert d.advertised_addresses("127.0.0.1", None) == ["127.0.0.1"]
    assert d.advertised_addresses("localhost", None) == ["127.0.0.1"]
    assert d.advertised_addresses("[::1]", LOOPBACK) == ["::1"]
    # A wildcard server is advertised on the mDNS interfaces...
    assert d.advertised_addresses("0.0.0.0", LOOPBACK) == ["127.0.0.1"]
    # ...or on the primary addresses, which exclude loopback unless there is nothing else.
    primary = d.advertised_addresses("0.0.0.0", None)
    assert primary == d.primary_addresses() and primary
    assert "127.0.0.1" not in primary or primary == ["127.0.0.1"]
    with pytest.raises(InvalidArgument):
        d.advertised_addresses("example.org", None)


def test_found_target_formats_ipv6() -> None:
    assert d.Found("n", ("10.0.0.2",), 7, {}).target == "10.0.0.2:7"
    assert d.Found("n", ("fd00::2",), 7, {}).target == "[fd00::2]:7"


@pytest.mark.parametrize(
    "advert",
    [
        d.Advert("node", "n1", "127.0.0.1", 0, {}),  # port
        d.Advert("node", "n.1", "127.0.0.1", 5000, {}),  # dot in the instance name
        d.Advert("node", "n" * 64, "127.0.0.1", 5000, {}),  # label too long
        d.Advert("node", "n1", "127.0.0.1", 5000, {"k": "v" * 300}),  # TXT entry too long
        d.Advert("node", "n1", "127.0.0.1", 5000, {"a=b": "v"}),  # '=' in a TXT key
        d.Advert("peer", "n1", "127.0.0.1", 5000, {}),  # unknown kind
    ],
)
def test_bad_adverts_are_refused(advert: d.Advert) -> None:
    with pytest.raises(InvalidArgument):
        d.Advertiser(advert, LOOPBACK)


def test_node_properties_schema() -> None:
    props = d.node_properties("ab12", "gpt2", "cuda:0", 1 << 30, 123.456789, (3, 9))
    assert props == {
        "id": "ab12",
        "proto": str(d.PROTOCOL_VERSION),
        "swarm": "gpt2",
        "device": "cuda:0",
        "mem": str(1 << 30),
        "speed": "123.457",
        "stage": "3-9",
        "tls": "0",
    }
    assert d.node_properties("a", "s", "cpu", 0, 1.0)["stage"] == ""
    assert d.node_properties("a", "s", "cpu", 0, 1.0, tls=True)["tls"] == "1"
    assert d.coordinator_properties("c", "s", tls=True)["tls"] == "1"


def test_an_instance_name_is_the_name_people_gave_cut_to_fit() -> None:
    assert d.instance_name("laptop", "3fa2c1d0") == "laptop-3fa2c1d0"
    assert d.instance_name("gpu.box.lan:7961", "3fa2c1d0") == "gpu-box-lan:7961-3fa2c1d0"
    assert d.instance_name("", "3fa2c1d0") == "3fa2c1d0"
    long = d.instance_name("é" * 40, "3fa2c1d0")  # 80 bytes of name: cut on a character
    assert long == "é" * 27 + "-3fa2c1d0" and len(long.encode()) == 63


def test_a_strangers_coordinator_is_passed_over_for_a_while_then_tried_again() -> None:
    """A coordinator found without the key is passed over for ``for_s``, from the last
    time it proved a stranger's; then its address is tried again (the swarm's own may have
    started there since)."""
    now = [100.0]
    passed = d.PassedOver(for_s=30.0, clock=lambda: now[0])
    assert passed.add("10.0.0.5:7000")
    assert not passed.add("10.0.0.5:7000")  # (said once a pass)
    now[0] += 20.0
    assert passed.add("10.0.0.6:7000")
    assert "10.0.0.5:7000" in passed and passed.current() == {"10.0.0.5:7000", "10.0.0.6:7000"}
    now[0] += 10.0
    assert "10.0.0.5:7000" not in passed and passed.current() == {"10.0.0.6:7000"}
    assert passed.add("10.0.0.5:7000")  # a stranger still: passed over again, said again
    now[0] += 29.0
    assert passed.current() == {"10.0.0.5:7000"}
    assert 7000 not in passed  # (not an address)


@pytest.mark.slow
def test_a_node_of_another_swarm_advertises_nothing(swarm: str, tmp_path: Any) -> None:
    """Tour D: `join --swarm other` advertised itself on mDNS before the coordinator refused
    it, so browsers on the LAN saw a node that was never in any swarm. It advertises once
    the swarm took it. (Every announcement is recorded, resolved or not: a node that
    announces and says goodbye at once would resolve as nothing.)"""
    seen: list[str] = []
    zc = Zeroconf(interfaces=LOOPBACK)
    browser = ServiceBrowser(zc, d.NODE_SERVICE, handlers=[lambda name, **_: seen.append(name)])
    try:
        with Swarm() as s:
            _, address = s.coordinator("--swarm", swarm)
            node = s.join(
                "--swarm", f"{swarm}-other", "--coordinator", address,
                "--cache-dir", str(tmp_path), "--name", f"n-{swarm[:8]}",
            )  # fmt: skip
            assert node.wait(timeout=120) == 1
            assert "runs swarm" in node.output, node.output
            time.sleep(2.0)  # (an announcement already sent would reach the browser by now)
        assert not [n for n in seen if f"n-{swarm[:8]}" in n], seen
    finally:
        browser.cancel()
        zc.close()
