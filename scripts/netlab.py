"""A simulated LAN made of Linux network namespaces, for tests and demos that need real
multicast between hosts (mDNS) or real addresses other than loopback. Used by
scripts/lan_demo.py and, through tests/netns.py, by the tests.

Layout (names carry a random suffix so concurrent runs never meet)::

    ns-br-SUFFIX:  br0 (bridge, multicast snooping off) -- vh0, vh1, ... (veth ends)
    ns-hI-SUFFIX:  eth0 (veth peer of vhI), 10.77.X.(I+1)/24, route 224.0.0.0/4 via eth0

X is random too. Nothing is added to the root namespace: each veth pair is created inside
the bridge namespace with its peer placed straight into the host namespace, and the
addresses exist only inside the host namespaces, which have no route anywhere else. On
exit every process started through the harness and every namespace is removed, also
when the body raised.

Usage::

    reason = unavailable()
    if reason: pytest.skip(reason)
    with SimulatedLan(hosts=3) as lan:
        proc = lan.popen(0, [sys.executable, "-c", "..."], stdout=subprocess.PIPE)
        lan.hosts[0].address  # "10.77.X.1"

``ip netns exec`` shares the host name with the root namespace. With
``SimulatedLan(own_hostnames=True)`` every command runs under ``unshare --uts`` with its
host's name (``Host.hostname``), as on real separate machines.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


def unavailable() -> str | None:
    """Why a simulated LAN cannot be built here, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (run the tests as root to include this one)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing: apt-get install -y iproute2"
    # Namespace creation can still be forbidden (unprivileged containers): try it.
    name = f"ns-probe-{secrets.token_hex(4)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass(frozen=True)
class Host:
    index: int
    netns: str  # namespace name, for `ip netns exec`
    address: str  # IPv4 address of eth0 inside the namespace
    interface: str = "eth0"
    hostname: str = ""  # what `hostname` says there, with own_hostnames (else the machine's)


class SimulatedLan:
    """N hosts on one bridge. Use as a context manager; see the module docstring."""

    def __init__(self, hosts: int = 3, prefix_len: int = 24, own_hostnames: bool = False) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("hosts must be in 1..200")
        if own_hostnames and shutil.which("unshare") is None:
            raise RuntimeError("own_hostnames needs `unshare` (util-linux)")
        self.suffix = secrets.token_hex(3)
        self.subnet = f"10.77.{secrets.randbelow(254) + 1}"
        self.prefix_len = prefix_len
        self.own_hostnames = own_hostnames
        self.bridge_ns = f"ns-br-{self.suffix}"
        self.hosts = [
            Host(
                i,
                f"ns-h{i}-{self.suffix}",
                f"{self.subnet}.{i + 1}",
                hostname=f"host{i}" if own_hostnames else "",
            )
            for i in range(hosts)
        ]
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    # -- setup / teardown

    def __enter__(self) -> SimulatedLan:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = ["ip", *(["-n", netns] if netns else []), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")

    def _add_netns(self, name: str) -> None:
        self._ip("netns", "add", name)
        self._namespaces.append(name)
        self._ip("link", "set", "lo", "up", netns=name)

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_netns(br)
        # mDNS (224.0.0.251) is link-local and floods even with snooping on (measured), but
        # other groups would be dropped until an IGMP querier shows up: turn snooping off.
        self._ip("link", "add", "br0", "type", "bridge", "mcast_snooping", "0", netns=br)
        self._ip("link", "set", "br0", "up", netns=br)
        for host in self.hosts:
            self._add_netns(host.netns)
            port = f"vh{host.index}"
            # Created inside the bridge namespace, peer moved straight into the host's:
            # neither end ever exists in the root namespace.
            self._ip(
                "link", "add", port, "type", "veth",
                "peer", "name", host.interface, "netns", host.netns,
                netns=br,
            )  # fmt: skip
            self._ip("link", "set", port, "master", "br0", "up", netns=br)
            self._ip(
                "addr", "add", f"{host.address}/{self.prefix_len}", "dev", host.interface,
                netns=host.netns,
            )  # fmt: skip
            self._ip("link", "set", host.interface, "multicast", "on", "up", netns=host.netns)
            # zeroconf sets IP_MULTICAST_IF and needs no route (measured); senders that do
            # not would find none, since the namespace has no default route.
            self._ip("route", "add", "224.0.0.0/4", "dev", host.interface, netns=host.netns)
        self._wait_carrier()
        log.info(
            "simulated LAN %s.0/%d with %d hosts", self.subnet, self.prefix_len, len(self.hosts)
        )

    def _wait_carrier(self, timeout_s: float = 5.0) -> None:
        """veth links come up asynchronously; sending before would lose the first packets."""
        deadline = time.monotonic() + timeout_s
        for host in self.hosts:
            while True:
                out = subprocess.run(
                    ["ip", "-n", host.netns, "-o", "link", "show", host.interface],
                    capture_output=True, text=True,
                ).stdout  # fmt: skip
                if "LOWER_UP" in out or time.monotonic() > deadline:
                    break
                time.sleep(0.05)

    def close(self) -> None:
        """Stop every process started here, then delete every namespace. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        self._procs.clear()
        for name in reversed(self._namespaces):
            # Anything still living in one of our namespaces was started inside it by us.
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            # Deleting a namespace destroys its veth ends, and with them their peers.
            done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("could not delete netns %s: %s", name, done.stderr.strip())
        self._namespaces.clear()

    # -- running things on a host

    def argv(self, host: int, argv: list[str]) -> list[str]:
        """The command line that runs ``argv`` inside host ``host``'s namespace (and, with
        own_hostnames, its own UTS namespace named after the host)."""
        h = self.hosts[host]
        if h.hostname:
            # unshare and sh both exec, so the final pid is still the command's own.
            setname = 'hostname "$0" && exec "$@"'
            argv = ["unshare", "--uts", "--", "sh", "-c", setname, h.hostname, *argv]
        return ["ip", "netns", "exec", h.netns, *argv]

    def popen(self, host: int, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` on host ``host``; it is stopped when the LAN closes.
        (`ip netns exec` execs the command, so the Popen's pid is the command's own.)"""
        proc = subprocess.Popen(self.argv(host, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(self, host: int, argv: list[str], timeout: float = 30, **kwargs: Any) -> Any:
        """Run ``argv`` on host ``host`` to completion (``subprocess.run`` semantics)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(host, argv), timeout=timeout, **kwargs)
