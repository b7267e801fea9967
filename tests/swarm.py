"""Real node processes for tests: started on 127.0.0.1 with free ports, always stopped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from nanoshard.cliutil import COORDINATOR as COORDINATOR_NAME
from nanoshard.cliutil import listening_pattern

BIN = Path(sys.executable).parent
LISTENING = listening_pattern()  # any server's "listening on" line
COORDINATOR = listening_pattern(COORDINATOR_NAME)
T = TypeVar("T")


def wait_until(what: str, check: Callable[[], T], timeout: float = 60.0, every: float = 0.3) -> T:
    """Poll ``check`` until it returns something true, and return that. A test waits here
    on exactly the condition it then asserts (never on a sleep, never on a weaker sign such
    as "listening"); a check that raises counts as not yet (the swarm is still forming).
    Fails after ``timeout`` seconds naming ``what`` and the last answer."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = check()
            if last:
                return last  # type: ignore[return-value]
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}"
            )
        time.sleep(every)


def settled(status: dict[str, Any], nodes: int | None = None, replicas: int = 1) -> dict | None:
    """``status`` (``status_json``'s form) if the swarm is at rest: ``nodes`` nodes (any
    number if None), each healthy and serving the stage placement gave it (none is still
    loading a new one, so routes will not change under the test), and every unit served by
    at least ``replicas`` of them; otherwise None."""
    members = status["nodes"]
    if nodes is not None and len(members) != nodes:
        return None
    if not all(n["healthy"] and n["serving"] == n["stage"] for n in members):
        return None
    if not all(u["replicas"] >= replicas for u in status["units"]):
        return None
    return status


class Proc:
    """A child process whose stdout we scan for its address; stopped by PID."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.lines: list[str] = []
        self.popen = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout: float) -> int:
        """Its exit code, once it has ended and all its output is read."""
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if m := pattern.search(line):
                    return m
            if self.popen.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise RuntimeError(
                    f"{self.args[:3]} exited {self.popen.returncode}:\n{self.output}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"{self.args[:3]} did not print {pattern.pattern!r}:\n{self.output}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            self.popen.send_signal(signal.SIGCONT)  # (a process a test stopped acts on it)
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=10)


class Swarm:
    """Processes a test started; ``close`` stops every one of them (use as a context manager)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        # the coordinators' state folder (exclusions), this swarm's own: kept across a
        # coordinator's restart within the test, never shared between tests
        self.state = tempfile.mkdtemp(prefix="nanoshard-state-")

    def start(self, args: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, env)
        self.procs.append(proc)
        return proc

    @staticmethod
    def serve_args(model: str, units: str, *extra: str) -> list[str]:
        return [str(BIN / "nanoshard-node"), "serve", "--model", model, "--units", units,
                "--port", "0", "--threads", "1", *extra]  # fmt: skip

    def node(
        self, model: str, units: str, *extra: str, env: dict[str, str] | None = None
    ) -> tuple[Proc, str]:
        """Start ``nanoshard-node serve`` and wait for its address."""
        proc = self.start(self.serve_args(model, units, *extra), env)
        return proc, proc.wait_for(LISTENING).group(1)

    def chain(self, model: str, splits: list[str], *extra: str) -> list[str]:
        """Start one node per stage (in parallel) and return their addresses in order."""
        procs = [self.start(self.serve_args(model, units, *extra)) for units in splits]
        return [p.wait_for(LISTENING).group(1) for p in procs]

    def serving(self, address: str) -> Proc:
        """The process listening on ``address`` (by its own "listening on" line: another's
        output may name it too, as its next hop)."""
        for proc in self.procs:
            said = next((m for line in list(proc.lines) if (m := LISTENING.search(line))), None)
            if said is not None and said.group(1) == address:
                return proc
        raise LookupError(f"no process of this swarm listens on {address}")

    def coordinator(self, *extra: str, port: int = 0) -> tuple[Proc, str]:
        """Start ``nanoshard coordinator`` on loopback (mDNS on loopback too)."""
        proc = self.start(
            [
                str(BIN / "nanoshard"),
                "coordinator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--mdns-interface",
                "127.0.0.1",
                *([] if "--state-dir" in extra else ["--state-dir", self.state]),
                *extra,
            ]
        )
        return proc, proc.wait_for(COORDINATOR, timeout=120).group(1)

    def join(self, *extra: str, env: dict[str, str] | None = None) -> Proc:
        """Start ``nanoshard-node join`` on loopback (it finds the coordinator itself
        unless ``--coordinator`` is among ``extra``)."""
        return self.start(
            [
                str(BIN / "nanoshard-node"),
                "join",
                "--host",
                "127.0.0.1",
                "--mdns-interface",
                "127.0.0.1",
                "--threads",
                "1",
                *extra,
            ],
            env,
        )

    def close(self) -> None:
        for proc in self.procs:
            proc.kill(signal.SIGTERM)
        self.procs.clear()
        shutil.rmtree(self.state, ignore_errors=True)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def local_tokens(*args: str) -> list[int]:
    """The token ids ``nanoshard generate --local ARGS`` gives, from the CLI's own parser and
    function run in this process: the reference a swarm's output must equal, without a new
    interpreter's seconds of imports (tests/test_cli.py runs the command itself)."""
    from nanoshard.cli.commands import build_parser
    from nanoshard.cli.generate import generate_locally

    return generate_locally(
        build_parser().parse_args(["generate", "--local", *args]), None
    ).token_ids


def nanoshard(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the ``nanoshard`` CLI as a user would."""
    return subprocess.run(
        [str(BIN / "nanoshard"), *args], capture_output=True, text=True, timeout=timeout
    )
