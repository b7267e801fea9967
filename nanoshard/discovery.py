"""Discovery plane: mDNS adverts and browsing (python-zeroconf).

Nodes advertise ``_nanoshard._tcp.local.``, the coordinator ``_nanoshard-coord._tcp.local.``.
An advert is an SRV record (address, port) plus a TXT record whose keys are the schema
below; a browser turns what it hears into :class:`Found` records. Everything here is a
thin shell over zeroconf: no policy, no retries beyond what mDNS itself does.

TXT schema (all values are strings; a TXT entry is at most 255 bytes):

    id      node id (hex)                 proto   PROTOCOL_VERSION
    swarm   swarm / model id              device  "cpu", "cuda:0", ...
    mem     free memory, bytes            speed   measured speed (the node's own unit)
    stage   current stage "start-end", or "" when the node serves none yet
    tls     "1" when the service's gRPC needs TLS (connect with --tls-ca), else "0"

Which interfaces mDNS uses is the caller's choice (``--mdns-interface``): ``None`` means
every interface, which is what a real LAN wants; tests and demos on this machine pass
``["127.0.0.1"]`` or an address inside a network namespace they made.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import ifaddr  # a dependency of zeroconf itself
from zeroconf import (
    InterfaceChoice,
    InterfacesType,
    IPVersion,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from nanoshard import PROTOCOL_VERSION
from nanoshard.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

NODE_SERVICE = "_nanoshard._tcp.local."
COORD_SERVICE = "_nanoshard-coord._tcp.local."

SERVICE_OF_KIND = {"node": NODE_SERVICE, "coordinator": COORD_SERVICE}

# mDNS defaults to 75 minutes for PTR/TXT records, so a volunteer that vanished without a
# goodbye would linger in long-running browsers for over an hour. Two minutes for every
# record bounds that; the extra refresh traffic is a few hundred bytes per service.
_TTL_S = 120
STOP_POLL_S = 0.1  # a wait that may be stopped looks at its stop this often
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
PASS_OVER_S = 10.0  # a stranger's coordinator is passed over this long, then tried again


# ----------------------------------------------------------------------------- interfaces


def _local_ips() -> list[tuple[ifaddr.Adapter, str]]:
    """Every (adapter, address) pair of this host, IPv6 addresses without their scope."""
    return [
        (adapter, ip.ip if isinstance(ip.ip, str) else ip.ip[0])
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
    ]


def zeroconf_interfaces(mdns_interfaces: list[str] | None) -> InterfacesType:
    """Map ``--mdns-interface`` values to zeroconf's ``interfaces`` argument.

    Each value is a local IP address (v4 or v6) or an interface name (``eth0``: its IPv4
    addresses, or its index for IPv6 when it has none). ``None`` or ``[]`` means every
    interface. Values that match nothing local raise :class:`InvalidArgument` here, because
    zeroconf itself would only log a warning and then stay silent.
    """
    if not mdns_interfaces:
        return InterfaceChoice.All
    local = _local_ips()
    out: list[str | int] = []
    for value in mdns_interfaces:
        try:
            addr: str | None = str(ipaddress.ip_address(value.split("%")[0]))
        except ValueError:
            addr = None
        if addr is not None:
            if all(addr != ip for _, ip in local):
                known = ", ".join(sorted({ip for _, ip in local}))
                raise InvalidArgument(
                    f"--mdns-interface {value}: no local interface has this address "
                    f"(local addresses: {known})"
                )
            out.append(addr)
            continue
        mine = [(a, ip) for a, ip in local if value in (a.name, a.nice_name)]
        if not mine:
            names = ", ".join(sorted({a.nice_name for a, _ in local}))
            raise InvalidArgument(
                f"--mdns-interface {value}: neither a local IP address nor an interface name "
                f"(interfaces: {names})"
            )
        v4 = [ip for _, ip in mine if ipaddress.ip_address(ip).version == 4]
        index = mine[0][0].index
        if v4:
            out.extend(v4)
        elif index is not None:
            out.append(index)  # zeroconf takes IPv6 interfaces by index
        else:
            raise InvalidArgument(f"--mdns-interface {value}: no IPv4 address and no index")
    return list(dict.fromkeys(out))  # drop duplicates, keep order


def primary_addresses() -> list[str]:
    """This host's LAN-facing addresses: every non-loopback, non-link-local IPv4 address
    (else the same for IPv6, else 127.0.0.1)."""
    usable = [ipaddress.ip_address(ip) for _, ip in _local_ips()]
    usable = [a for a in usable if not (a.is_loopback or a.is_link_local)]
    v4 = sorted({str(a) for a in usable if a.version == 4})
    v6 = sorted({str(a) for a in usable if a.version == 6})
    return v4 or v6 or ["127.0.0.1"]


def advertised_addresses(listen_host: str, mdns_interfaces: list[str] | None) -> list[str]:
    """The addresses an advert names for a server listening on ``listen_host``.

    A server bound to one address is reachable only there, so that address wins. A
    wildcard server is advertised on the addresses mDNS itself is bound to (those are the
    networks the advert reaches), else on the primary addresses.
    """
    if listen_host not in _WILDCARD_HOSTS:
        host = "127.0.0.1" if listen_host == "localhost" else listen_host.strip("[]")
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        try:  # a host name: advertise what it resolves to, as the server bound to that
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as e:
            raise InvalidArgument(f"listen host {listen_host!r} does not resolve: {e}") from e
        return list(dict.fromkeys(str(info[4][0]) for info in infos))
    choice = zeroconf_interfaces(mdns_interfaces)
    if isinstance(choice, list):
        addrs = [a for a in choice if isinstance(a, str)]
        if addrs:
            return addrs
    return primary_addresses()


# ----------------------------------------------------------------------------- adverts


def node_properties(
    node_id: str,
    swarm: str,
    device: str,
    free_mem: int,
    speed: float,
    stage: tuple[int, int] | None = None,
    tls: bool = False,
) -> dict[str, str]:
    """The TXT record of a node advert (see the schema at the top of this module)."""
    return {
        "tls": "1" if tls else "0",
        "id": node_id,
        "proto": str(PROTOCOL_VERSION),
        "swarm": swarm,
        "device": device,
        "mem": str(int(free_mem)),
        "speed": f"{speed:.6g}",
        "stage": stage_txt(stage),
    }


def coordinator_properties(coordinator_id: str, swarm: str, tls: bool = False) -> dict[str, str]:
    """The TXT record of a coordinator advert (``tls``: its gRPC needs TLS)."""
    props = {"id": coordinator_id, "proto": str(PROTOCOL_VERSION), "swarm": swarm}
    return props | {"tls": "1" if tls else "0"}


def stage_txt(stage: tuple[int, int] | None) -> str:
    return "" if stage is None else f"{stage[0]}-{stage[1]}"


def instance_name(name: str, unique: str) -> str:
    """An mDNS instance name people can read in a service browser: ``name`` (a node's
    ``--name``, or host:port), dots made dashes, cut to fit 63 bytes with ``-unique`` (an
    id of the process: two processes may share a name)."""
    tail = f"-{unique}"
    head = name.replace(".", "-").encode()[: 63 - len(tail.encode())]
    return head.decode(errors="ignore") + tail if head else unique


@dataclass
class Advert:
    """What one process advertises. ``name`` is the instance name, unique per process
    (``instance_name``); ``host`` is the address the gRPC server listens
    on (``0.0.0.0`` for all), from which the advertised addresses are derived."""

    kind: str  # "node" or "coordinator"
    name: str
    host: str
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def service_type(self) -> str:
        if self.kind not in SERVICE_OF_KIND:
            raise InvalidArgument(
                f"advert kind {self.kind!r} is not one of {list(SERVICE_OF_KIND)}"
            )
        return SERVICE_OF_KIND[self.kind]


def _check_txt(properties: Mapping[str, str]) -> None:
    for key, value in properties.items():
        entry = f"{key}={value}".encode()
        if not key or "=" in key or len(entry) > 255:
            raise InvalidArgument(
                f"TXT entry {key!r}: keys must be non-empty without '=', "
                f"and key=value at most 255 bytes (got {len(entry)})"
            )


class Advertiser:
    """Registers one advert while open; ``update`` republishes its TXT record (stage
    changes, free memory); ``close`` sends the mDNS goodbye (graceful leave).

    Registering blocks for about 1.5 s: mDNS probes the name three times before
    announcing it, so two processes can never advertise the same instance name.
    """

    def __init__(self, advert: Advert, mdns_interfaces: list[str] | None = None) -> None:
        if not 0 < advert.port < 65536:
            raise InvalidArgument(f"advert port {advert.port} is not in 1..65535")
        if len(advert.name.encode()) > 63 or not advert.name or "." in advert.name:
            raise InvalidArgument(f"instance name {advert.name!r}: 1..63 bytes, no dots")
        _check_txt(advert.properties)
        self.advert = advert
        self.addresses = advertised_addresses(advert.host, mdns_interfaces)
        self._info = self._service_info(advert.properties)
        self._lock = threading.Lock()
        self._closed = False
        # use_asyncio=False: always run zeroconf's own loop thread, so this blocking API
        # also works when the caller happens to run inside an asyncio loop.
        self._zc = Zeroconf(interfaces=zeroconf_interfaces(mdns_interfaces), use_asyncio=False)
        try:
            self._zc.register_service(self._info)
        except BaseException:
            self._zc.close()
            raise
        log.info(
            "advertising %s %s at %s:%d", advert.kind, advert.name, self.addresses, advert.port
        )

    def _service_info(self, properties: Mapping[str, str]) -> ServiceInfo:
        stype = self.advert.service_type
        full = f"{self.advert.name}.{stype}"
        return ServiceInfo(
            stype,
            full,
            port=self.advert.port,
            # The host name of the address records. The machine's own host name would be
            # shared by every process (and by network namespaces), which may advertise
            # different addresses, so each advert gets its own, as zeroconf does by default.
            server=full,
            properties=dict(properties),
            parsed_addresses=self.addresses,
            host_ttl=_TTL_S,
            other_ttl=_TTL_S,
        )

    def update(self, properties: Mapping[str, str]) -> None:
        """Merge ``properties`` into the TXT record and republish it."""
        merged = {**self.advert.properties, **properties}
        _check_txt(merged)
        with self._lock:
            if self._closed:
                raise FailedPrecondition(f"advert {self.advert.name} is closed; open a new one")
            self.advert.properties = merged
            self._info = self._service_info(merged)
            self._zc.update_service(self._info)

    def close(self) -> None:
        """Say goodbye (browsers drop the service within about a second) and stop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._zc.unregister_service(self._info)
        except Exception:  # a goodbye that cannot be sent must not block shutdown
            log.warning("mDNS goodbye for %s failed", self.advert.name, exc_info=True)
        self._zc.close()

    def __enter__(self) -> Advertiser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- browsing


@dataclass(frozen=True)
class Found:
    """A service heard on the network."""

    name: str  # instance name, without the service type
    addresses: tuple[str, ...]  # IPv4 first
    port: int
    properties: dict[str, str]

    @property
    def target(self) -> str:
        """``HOST:PORT`` of the first address, as gRPC wants it."""
        host = self.addresses[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def require_tls(self, tls: bool, flags: str = "") -> None:
        """FailedPrecondition naming ``--tls-ca`` (and ``flags``) if the service needs TLS
        (its TXT record says) and the caller has none (``tls``)."""
        if self.properties.get("tls") == "1" and not tls:
            raise needs_tls(self.target, flags)


def needs_tls(target: str, flags: str = "") -> FailedPrecondition:
    """The error of a caller without TLS whose coordinator, at ``target``, serves TLS."""
    return FailedPrecondition(
        f"the coordinator at {target} needs TLS: pass --tls-ca (the swarm's CA){flags}"
    )


def _found(info: ServiceInfo, service_type: str) -> Found | None:
    if info.port is None:
        return None
    addrs = info.parsed_scoped_addresses(IPVersion.V4Only) + info.parsed_scoped_addresses(
        IPVersion.V6Only
    )
    if not addrs:
        return None
    props = {k: ("" if v is None else v) for k, v in info.decoded_properties.items()}
    name = info.name.removesuffix("." + service_type)
    return Found(name=name, addresses=tuple(addrs), port=info.port, properties=props)


class Watcher:
    """A live view of the services of one type, kept up to date by a zeroconf browser.

    ``on_change(name, found)`` is called on the browser thread for every change, with
    ``found=None`` when the service left.
    """

    def __init__(
        self,
        service_type: str,
        mdns_interfaces: list[str] | None = None,
        on_change: Callable[[str, Found | None], None] | None = None,
    ) -> None:
        self.service_type = service_type
        self._on_change = on_change
        self._services: dict[str, Found] = {}
        self._cond = threading.Condition()
        self._zc = Zeroconf(interfaces=zeroconf_interfaces(mdns_interfaces), use_asyncio=False)
        self._browser = ServiceBrowser(self._zc, service_type, handlers=[self._handle])

    def _handle(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # An exception here would end zeroconf's browser thread, and with it all discovery:
        # a malformed advert from some peer or a failing callback must cost one event only.
        try:
            self._apply(zeroconf, service_type, name, state_change)
        except Exception:
            log.exception("mDNS event %s %s dropped", state_change.name, name)

    def _apply(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Runs on the browser's own thread, so a blocking resolve here is fine.
        short = name.removesuffix("." + service_type)
        found = None
        if state_change is not ServiceStateChange.Removed:
            info = zeroconf.get_service_info(service_type, name, timeout=1500)
            found = _found(info, service_type) if info is not None else None
            if found is None:
                log.debug("%s %s: could not resolve", state_change.name, name)
                return
        log.debug("%s %s: %s", state_change.name, name, found)
        with self._cond:
            if found is None:
                if self._services.pop(short, None) is None:
                    return
            else:
                if self._services.get(short) == found:
                    return
                self._services[short] = found
            self._cond.notify_all()
        if self._on_change is not None:
            self._on_change(short, found)

    def services(self) -> dict[str, Found]:
        with self._cond:
            return dict(self._services)

    def wait_for(
        self,
        predicate: Callable[[dict[str, Found]], bool],
        timeout_s: float,
        stop: threading.Event | None = None,
    ) -> bool:
        """Block until ``predicate(services)`` holds or ``timeout_s`` passes (or ``stop`` is
        set: a caller interrupted, which is looked at every ``STOP_POLL_S``)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._services):
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    return False
                self._cond.wait(min(left, STOP_POLL_S) if stop is not None else left)
            return True

    def close(self) -> None:
        if self._zc.done:
            return
        self._browser.cancel()
        self._zc.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def browse(
    service_type: str,
    timeout_s: float = 3.0,
    interfaces: list[str] | None = None,
    want: int = 1,
    match: Callable[[Found], bool] | None = None,
    stop: threading.Event | None = None,
) -> list[Found]:
    """Services of ``service_type`` (those ``match`` accepts), returned as soon as ``want``
    are found or when ``timeout_s`` passes (or ``stop`` is set), sorted by name."""
    accept = match or (lambda _f: True)

    def matching(services: dict[str, Found]) -> list[Found]:
        return sorted((f for f in services.values() if accept(f)), key=lambda f: f.name)

    with Watcher(service_type, interfaces) as watcher:
        watcher.wait_for(lambda s: len(matching(s)) >= want, timeout_s, stop)
        return matching(watcher.services())


class PassedOver:
    """The addresses of coordinators found without the swarm key (strangers'), each passed
    over for ``for_s`` from the last time it proved a stranger's, then tried again: the
    swarm's own may have started there since (a coordinator restarted with its key, on the
    same port, after it was started without it)."""

    def __init__(
        self, for_s: float = PASS_OVER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.for_s, self.clock = for_s, clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()  # (a client's look-ups run on worker threads)

    def add(self, target: str) -> bool:
        """Pass ``target`` over from now on; False if it was passed over already."""
        with self._lock:
            new = target not in self
            self._until[target] = self.clock() + self.for_s
            return new

    def __contains__(self, target: object) -> bool:
        until = self._until.get(target) if isinstance(target, str) else None
        return until is not None and self.clock() < until

    def current(self) -> frozenset[str]:
        """The addresses passed over now (the others are forgotten)."""
        with self._lock:
            now = self.clock()
            self._until = {t: until for t, until in self._until.items() if now < until}
            return frozenset(self._until)


def _this_version(f: Found) -> bool:
    """Whether ``f`` speaks this protocol version (another one's calls would fail)."""
    return f.properties.get("proto") == str(PROTOCOL_VERSION)


def find_coordinator(
    interfaces: list[str] | None = None,
    timeout_s: float = 3.0,
    swarm: str | None = None,
    stop: threading.Event | None = None,
    passed_over: Collection[str] = (),
) -> Found | None:
    """The first coordinator of this protocol version (and of ``swarm``, when given) whose
    address is not in ``passed_over``; None if none answers within ``timeout_s`` (or
    ``stop`` is set first)."""

    def match(f: Found) -> bool:
        if not _this_version(f) or f.target in passed_over:
            return False
        return swarm is None or f.properties.get("swarm") == swarm

    found = browse(COORD_SERVICE, timeout_s, interfaces, want=1, match=match, stop=stop)
    return found[0] if found else None


def other_swarms(
    swarm: str,
    interfaces: list[str] | None = None,
    timeout_s: float = 1.0,
    stop: threading.Event | None = None,
) -> list[str]:
    """The swarms other than ``swarm`` whose coordinators (of this protocol version) answer
    within ``timeout_s``: what a node that finds none of its own may have meant."""

    def other(f: Found) -> bool:
        return _this_version(f) and f.properties.get("swarm") not in (None, swarm)

    # (``want`` never reached: it gathers every answer until the timeout)
    found = browse(COORD_SERVICE, timeout_s, interfaces, want=2**31, match=other, stop=stop)
    return sorted({str(f.properties["swarm"]) for f in found})
