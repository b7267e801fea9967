"""Channels over slow links: a node far away answers the first call of a new channel.

The link is a TCP relay on loopback that holds every chunk for ``DELAY_S`` in each
direction (this machine's kernel has no netem), in front of a real gRPC server over TLS."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from nanoshard import rpc
from nanoshard.certs import make_certs
from nanoshard.security import Security

DELAY_S = 0.06  # each way: a 120 ms round trip, as between continents


class Relay:
    """Relays loopback connections to ``target_port``, each chunk ``DELAY_S`` late."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        async def start() -> asyncio.Server:
            server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            return server

        self.server = self.loop.run_until_complete(start())
        ready.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(reader, to_writer), self._pipe(to_reader, writer), return_exceptions=True
        )

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(DELAY_S)  # (one chunk at a time: in order)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            relaying = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in relaying:
                task.cancel()
            await asyncio.gather(*relaying, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def far_tls_server(tmp_path: Path) -> Iterator[tuple[str, Security]]:
    """A TLS echo server with nanoshard's server options, reached through a ``Relay``: its
    address, and a caller's security trusting its CA."""
    make_certs(tmp_path, ["127.0.0.1"])
    server = grpc.server(futures.ThreadPoolExecutor(2), options=rpc.server_options())
    echo = grpc.unary_unary_rpc_method_handler(lambda request, _context: request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"E": echo}),))
    key, cert = (tmp_path / "127.0.0.1.key").read_bytes(), (tmp_path / "127.0.0.1.pem").read_bytes()
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    relay = Relay(port)
    try:
        yield f"127.0.0.1:{relay.port}", Security(tls_ca=tmp_path / "ca.pem")
    finally:
        relay.close()
        server.stop(0)


def test_a_new_channel_over_tls_to_a_node_120_ms_away_answers_its_first_call(
    far_tls_server: tuple[str, Security],
) -> None:
    """Its connection takes the TCP and TLS handshakes and HTTP/2's first SETTINGS, four
    round trips or more. gRPC bounds one connection attempt by the channel's
    ``grpc.min_reconnect_backoff_ms``: at the 200 ms nanoshard once set, every first call
    of every new channel failed here ("timed out before receiving SETTINGS frame"), and a
    client or node took the node for gone."""
    address, security = far_tls_server
    for _ in range(2):  # (each a new channel, a new connection)
        channel = rpc.open_channel(address, security)
        try:
            started = time.monotonic()
            assert channel.unary_unary("/t.T/E")(b"ping", timeout=30) == b"ping"
            assert time.monotonic() - started >= 4 * DELAY_S  # (the relay did delay it)
        finally:
            channel.close()
