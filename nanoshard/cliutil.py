"""What both command-line tools share: one-line errors, sizes, logging, the "listening on" line."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import importlib
import importlib.metadata
import logging
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from nanoshard.errors import NanoshardError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what stops a command, or a server

# Who prints a "listening on" line: the coordinator, a node's data plane, the HTTP gateway
# (whose address is a URL: http://HOST:PORT).
COORDINATOR = "nanoshard coordinator"
NODE = "nanoshard-node"
API = "nanoshard api"
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the installed nanoshard's."""
    try:
        version = importlib.metadata.version("nanoshard")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        version = "unknown (not installed)"
    parser.add_argument("--version", action="version", version=f"%(prog)s {version}")


def add_verbose(parser: argparse.ArgumentParser, commands: Any) -> None:
    """``-v``/``--verbose`` before the command and after it (``nanoshard generate -v``):
    each of ``commands`` (the tool's subparsers) takes it too, and leaves the tool's own
    value alone when not given."""
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for command in {id(p): p for p in commands.choices.values()}.values():
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )


def parse_command_line(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """``parser.parse_args(argv)`` for a tool of commands (its subparsers' dest is
    ``command``, not required). argparse alone takes an unknown option before the command
    (``nanoshard --bogus``) for a missing command; here each mistake is one line that names
    it and says where the options are listed. Exit code 2, as argparse's own errors."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        listed_by = f"{parser.prog} {args.command}" if args.command else parser.prog
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see {listed_by} --help)")
    if args.command is None:
        parser.error(f"give a command (see {parser.prog} --help)")
    return args


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1.5GiB``, ``1000000`` -> bytes (binary multiples)."""
    m = SIZE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 512M or 2G)")
    scale = 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    return int(float(m.group(1)) * scale)


def size_arg(text: str) -> int:
    """``parse_size`` for argparse: a bad size is the flag's one-line error."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_size_arg(text: str) -> int:
    """``size_arg`` for a size that must hold something: 0 is the flag's one-line error."""
    n = size_arg(text)
    if n == 0:
        raise argparse.ArgumentTypeError("give a size above 0 (512K, 64M, 2G, ...)")
    return n


def memory_arg(text: str) -> int:
    """``positive_size_arg`` for a node's memory: a number without a unit below 64 KiB is
    bytes, too few to hold anything, and most likely a unit left out."""
    n, given = positive_size_arg(text), text.strip()
    if given.isdigit() and n < 2**16:
        raise argparse.ArgumentTypeError(
            f"{given} bytes holds nothing: give a unit ({given}M, 2G, ...)"
        )
    return n


def port_arg(text: str) -> int:
    """A port for argparse: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port}: give 0 (any free one) to 65535")
    return port


def address_arg(text: str) -> str:
    """A HOST:PORT for argparse."""
    from nanoshard.rpc import check_address

    try:
        return check_address(text)
    except NanoshardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def codec_arg(text: str) -> str:
    """A codec's name for argparse (``codec.check_codec``)."""
    from nanoshard.codec import check_codec

    try:
        return check_codec(text)
    except NanoshardError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_seconds(text: str) -> float:
    """A time in seconds for argparse: finite and above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} s: give a time above 0")
    return value


def share_arg(text: str) -> float:
    """A share for argparse (a rate of checks): a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:  # (NaN too)
        raise argparse.ArgumentTypeError(f"{text}: give a number in [0, 1]")
    return value


def format_size(n: int) -> str:
    """Bytes for people, in the binary units parse_size reads: ``3.1 MiB``, ``11.5 GiB``."""
    if n >= 2**40:
        return f"{n / 2**40:.1f} TiB"
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.1f} MiB"


def listening_line(who: str, address: str) -> str:
    """The line a server prints on stdout once it accepts calls (``who``: COORDINATOR, NODE
    or API).

    Scripts, tests and the demo wait for it to learn the port: see listening_pattern.
    """
    return f"{who}: listening on {address}"


def listening_pattern(who: str | None = None) -> re.Pattern[str]:
    """Finds a listening_line (of ``who``, else of any server) in output; group 1 is the
    HOST:PORT."""
    return re.compile((re.escape(who) if who else r"\S+") + r": listening on (\S+)")


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Log to stderr: what a long-running role does (INFO); with ``quiet`` (a command that
    prints its own results, as ``generate``), warnings only; with ``verbose``, everything."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)


def run_loaded(
    prog: str, module: str, argv: list[str] | None, servers: frozenset[str] = frozenset()
) -> None:
    """A console script's ``main``: import ``module`` (torch and the rest: a second or
    two), then run its ``main(argv)``. Ctrl-C or SIGTERM while it loads ends it once the
    import is over (``_SIGNALLED``) as it does later: one line and exit 130 or 143 (0 for
    SIGTERM to one of its ``servers`` commands: how a server is meant to be stopped,
    ``server_exit``), not a traceback from the middle of an import (or, for SIGTERM, an
    end without a word). So does one that comes once it is loaded, before the command
    takes the signals itself (it ended the process by the signal, without a word).

    The native libraries' own log lines (gRPC's C core: a TLS handshake that failed, with
    its source file; torch's C++: a group's rendezvous polling for a member that died)
    would reach the terminal beside the command's own account of the same thing: only
    their errors do, unless ``-v``. Each reads its setting once, as it loads: set first."""
    args = sys.argv[1:] if argv is None else argv
    command = next((a for a in args if not a.startswith("-")), None)
    _SIGNALLED.clear()
    unblock_stop_signals()
    if not {"-v", "--verbose"} & set(args):
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # (as ``interruptible`` does later: Ctrl-C is taken even where the tool started with
    # SIGINT ignored, as a shell script's background job does)
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _note_signal)  # (acted on once the import is over)
    try:
        main = importlib.import_module(module).main
        if _SIGNALLED:
            raise KeyboardInterrupt if _SIGNALLED[-1] == signal.SIGINT else Terminated
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        sys.exit(0 if command in servers else 128 + signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # (as asyncio.run expects)
        terminate = _raise_server_terminated if command in servers else _raise_terminated
        signal.signal(signal.SIGTERM, terminate)
    main(argv)


# The stop signals a tool took while it loaded or started. An exception raised in the
# middle of the libraries' imports can be swallowed (torch's C init imports numpy and drops
# any error of that import: a SIGTERM in a node's first half-second was lost 1 time in 10,
# and the node served on) or end the process in C++ (pybind11: "terminate called after
# throwing"), so while a tool loads its signals are only noted, and acted on once the
# import is over (``run_loaded``, a second or two); one whose exception a library swallows
# as a server starts is acted on when the server takes the signals (``stop_on_signals``).
_SIGNALLED: list[int] = []


def _note_signal(signum: int, _frame: object) -> None:
    _SIGNALLED.append(signum)


def _raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated


def _raise_server_terminated(signum: int, _frame: object) -> None:
    _SIGNALLED.append(signum)
    raise Terminated(server=True)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread of a command that holds something on other
    machines (a generation's session on its nodes), so that it lets it go as on Ctrl-C
    (``interruptible``). ``run_cli`` ends it with one line and exit 143 (128 + 15), or 0
    for a server, which SIGTERM is how to stop (``server_exit``)."""

    def __init__(self, server: bool = False) -> None:
        super().__init__()
        self.server = server


def interruptible() -> None:
    """From now on, Ctrl-C raises KeyboardInterrupt and SIGTERM ``Terminated`` in the main
    thread, instead of ending the process where it stands (SIGTERM), or of nothing at all
    (Ctrl-C, where the command started ignoring SIGINT, as a shell script's background job
    does: Python then installs no handler of its own)."""

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminated)


def unblock_stop_signals() -> None:
    """Take Ctrl-C and SIGTERM even if the process started with them blocked: a parent
    that blocks them while it starts a child (so that a signal cannot come between the
    child's start and its record: the demo) passes its mask on through exec. (Undoing it
    in the child, rather than between fork and exec in a ``preexec_fn``, lets Python start
    the child without fork(): gRPC's fork handlers can crash a child forked beside live
    channels, before its exec, with "epoll_wait error: Bad file descriptor".) A signal
    that came meanwhile is delivered now."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def run_cli(prog: str, main: Callable[[], int | None]) -> None:
    """Run a CLI: a nanoshard error is one line on stderr and exit 1, never a traceback;
    Ctrl-C one line and 130, SIGTERM (where the command takes it) one line and 143. A
    signal once the command is done changes nothing (``_end_on_signals``)."""
    unblock_stop_signals()
    code: int | None = None
    try:
        code = _outcome(prog, main)
        _end_on_signals(code)
    except KeyboardInterrupt:  # (the instant the command ended: by the signal's code)
        _exit_now(130 if code is None else code)
    except Terminated:
        _exit_now(128 + signal.SIGTERM if code is None else code)
    sys.exit(code)


def _outcome(prog: str, main: Callable[[], int | None]) -> int:
    try:
        return main() or 0
    except NanoshardError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Terminated as exc:
        print(f"{prog}: terminated", file=sys.stderr)
        return 0 if exc.server else 128 + signal.SIGTERM
    except BrokenPipeError:
        return 0


def _end_on_signals(code: int) -> None:
    """The command is done, with exit ``code``, and the process ends, which takes a moment
    (threads joined, torch's clean-up). A Ctrl-C or SIGTERM meanwhile would raise in the
    middle of it (a traceback, and exit 0): instead it ends the process at once with the
    same code, until the exit handlers run; from then on it is ignored (Python restores
    the default action, death by the signal, for its last instants)."""
    if threading.current_thread() is not threading.main_thread():
        return  # (signals are the main thread's)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda _signum, _frame: _exit_now(code))
    atexit.unregister(hold_stop_signals)
    atexit.register(hold_stop_signals)  # (the last registered: the first to run)


def _exit_now(code: int) -> NoReturn:
    """End the process at once with ``code``, what it wrote flushed."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def stop_on_signals(stop: asyncio.Event) -> list[int]:
    """Set ``stop`` on SIGINT or SIGTERM (when running in the main thread). Returns the
    signals received, filled in as they come: the first is what stopped the server (its
    exit code: server_exit)."""
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()
        for each in STOP_SIGNALS:  # the server stops cleanly from here
            loop.remove_signal_handler(each)
        hold_stop_signals()

    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (RuntimeError, ValueError):  # not the main thread: the caller stops us
            break
    else:
        if _SIGNALLED:  # (taken as the server started, and swallowed: it stops it now)
            loop.call_soon(on_signal, _SIGNALLED[-1])
            _SIGNALLED.clear()
    return received


def hold_stop_signals() -> None:
    """A server asked to stop stops cleanly: another Ctrl-C or SIGTERM changes nothing,
    until the command is done (``run_cli`` then takes them). Its event loop, once closed,
    would put the default actions back meanwhile (a SIGTERM then ended the process by the
    signal, not 0)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def server_exit(stopped_by: int | None) -> int:
    """A server's exit code once it has stopped cleanly, by the signal that asked it to
    (None: it ended by itself). Ctrl-C (SIGINT) ends it as it ends any command, one line
    and 130 (raised as KeyboardInterrupt, for run_cli); SIGTERM (docker stop, systemd,
    kill) is how a server is meant to be stopped, so its clean stop is 0."""
    if stopped_by == signal.SIGINT:
        raise KeyboardInterrupt
    return 0
