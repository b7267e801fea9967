"""The ``nanoshard`` command's own behaviour: the status view at any terminal width, and
flags that would be silently ignored."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from rich.console import Console
from swarm import BIN, LISTENING, Proc, Swarm, wait_until

from nanoshard.checkpoint import save_hf_checkpoint
from nanoshard.cli import main
from nanoshard.cli.commands import build_parser
from nanoshard.cli.demo import print_hops
from nanoshard.cli.generate import quiet_once
from nanoshard.cli.statusview import StatusView
from nanoshard.client.sdk import GenerationResult
from nanoshard.cliutil import memory_arg, parse_command_line
from nanoshard.config import GPTConfig, unit_name
from nanoshard.engine import init_weights
from nanoshard.node import main as node_main
from nanoshard.node.cli import build_parser as node_parser
from nanoshard.v1 import coordinator_pb2 as cpb
from nanoshard.v1 import node_pb2 as pb
from nanoshard.v1 import node_pb2_grpc as pb_grpc

GPT2 = GPTConfig(n_layer=12, n_head=12, n_embd=768)
NODES = [  # (name, address, device, dtype): the second is still loading, the third excluded
    ("alice-laptop", "192.168.178.23:50051", "cuda:0", "bf16"),
    ("node-7f3a9c21", "[fd00::1a2b:3c4d]:7961", "cpu", "fp32"),
    ("bob-workstation", "10.0.0.7:7961", "mps", "int8"),
]


def swarm_status(config: GPTConfig = GPT2) -> cpb.SwarmStatus:
    """Three nodes assigned [0, 5), [5, n) and [0, n) of ``config``'s units."""
    n = config.n_units
    stages = [(0, 5), (5, n), (0, n)]
    nodes = []
    for i, ((name, address, device, dtype), (start, end)) in enumerate(
        zip(NODES, stages, strict=True)
    ):
        nodes.append(
            cpb.NodeStatus(
                node_id=f"{i:016x}",
                name=name,
                address=address,
                capacity=cpb.Capacity(
                    device=device, dtype=dtype, memory_bytes=(i + 1) * 3 << 30, block_ms=2.125
                ),
                assignment=cpb.Assignment(start=start, end=end),
                ready=i != 1,
                ready_start=start if i != 1 else 0,
                ready_end=end if i != 1 else 0,
                load=cpb.NodeLoad(
                    sessions=12,
                    queue_depth=3,
                    step_ms_p50=90.0,
                    live=cpb.LiveLoad(decode_ms=41.25, speed_ratio=4.9 if i == 0 else 1.1),
                ),
                last_heartbeat_s=1.5,
                healthy=i != 1,
                checks_passed=120,
                checks_failed=i,
                excluded="disagreed 3 times" if i == 2 else "",
                own_ratio=4.9 if i == 0 else 1.1,  # beyond what the others share
                slowdown=3.2 if i == 1 else 1.0,  # placement counts it slowed
            )
        )
    served = [0] * n
    for start, end in stages[::2]:  # node 1 is still loading
        for u in range(start, end):
            served[u] += 1
    return cpb.SwarmStatus(
        swarm="lab",
        model_id="ab" * 32,
        model_name="gpt2",
        n_units=config.n_units,
        nodes=nodes,
        units=[
            cpb.UnitCoverage(unit=u, name=unit_name(config, u), replicas=served[u])
            for u in range(config.n_units)
        ],
        tokens_per_s=21.5,
        measured_tokens_per_s=12.5,
        replicas_target=2,
        placement_version=7,
    )


def render(status: cpb.SwarmStatus, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(StatusView(status))
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_status_shows_names_addresses_and_devices_whole_at_any_width(width: int) -> None:
    out = render(swarm_status(), width)
    assert max(len(line) for line in out.splitlines()) <= width
    for name, address, device, dtype in NODES:
        for whole in (name, address, f"{device}/{dtype}"):
            assert whole in out, (whole, out)
    for figure in ("1.5s", "2.12ms", "q3 41.2ms", "120/1", "EXCLUDED", "DOWN", "loading"):
        assert figure in out, (figure, out)
    assert out.count("x4.9") == 1 and "x1.1" not in out  # a slowed node: its live slowdown
    assert out.count("x3.2") == 1  # one placement counts slowed
    assert "measured 12.5 tokens/s" in " ".join(out.split())
    for phrase in ("measured 12.5 tokens/s (last 10 s)", "estimated 21.5 tokens/s per session"):
        assert phrase in out, out  # on one line: the summary breaks between phrases only
    assert "…" not in out.replace("abababababab…", "")  # nothing cut but the model id


def test_the_demos_summary_breaks_between_phrases_at_80_columns() -> None:
    """`make demo` ended with "... then 9.8\nms/token" at 80 columns."""
    result = GenerationResult("", [1] * 120, [1], "max_new_tokens", 20.0, [9.8] * 119)
    console = Console(width=80, file=io.StringIO(), color_system=None)
    print_hops(console, result)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "then 9.8 ms/token" in out and "time to first token 20 ms," in out, out


def test_a_node_on_time_but_not_serving_is_standby_or_loading_not_down() -> None:
    status = swarm_status()
    status.nodes[1].heartbeating = True  # loading its stage, heartbeating on time
    status.nodes.add(name="spare-box", address="10.0.0.9:7961", heartbeating=True)  # idle
    status.nodes[-1].assignment.idle = True
    wide = render(status, 200)
    row = {n.name: next(r for r in wide.splitlines() if n.name in r) for n in status.nodes}
    assert "standby" in row["spare-box"] and "DOWN" not in row["spare-box"], wide
    assert "loading" in row["node-7f3a9c21"] and "DOWN" not in row["node-7f3a9c21"], wide
    assert "DOWN" not in wide  # nobody is late
    late = swarm_status()  # the loading node's heartbeats stopped: it is down
    assert "DOWN" in render(late, 200)
    # a node given less than a MiB (it stands by) read "0 MiB"
    status.nodes[-1].capacity.memory_bytes = 500 << 10
    assert "500 KiB" in next(r for r in render(status, 200).splitlines() if "spare-box" in r)
    status.nodes[-1].capacity.memory_bytes = int(2.6 * 2**20)  # --max-memory 2.6M read "3 MiB"
    assert "2.6 MiB" in next(r for r in render(status, 200).splitlines() if "spare-box" in r)


def test_a_wide_terminal_gets_one_row_per_node() -> None:
    wide = render(swarm_status(), 200)
    rows = [line for line in wide.splitlines() if "alice-laptop" in line]
    assert len(rows) == 1 and "192.168.178.23:50051" in rows[0] and "cuda:0/bf16" in rows[0]
    assert "heartbeat" in wide


def test_an_80_column_terminal_gets_two_lines_per_node() -> None:
    narrow = render(swarm_status(), 80)
    lines = narrow.splitlines()
    at = next(i for i, line in enumerate(lines) if "alice-laptop" in line)
    assert "cuda:0/bf16" in lines[at] and "192.168.178.23:50051" in lines[at + 1]


def test_coverage_of_a_long_model_is_runs_of_units() -> None:
    xl = GPTConfig(n_layer=48, n_head=25, n_embd=1600)  # 50 units: no column each at 80
    out = render(swarm_status(xl), 80)
    assert "┃ b47" not in out
    assert "coverage (replicas): embed–b3 2, b4–head 1" in " ".join(out.split())


def test_names_from_the_swarm_are_not_read_as_markup() -> None:
    status = swarm_status()
    status.nodes[0].name = "[bold]mallory[/bold]"
    for width in (80, 200):
        assert "[bold]mallory[/bold]" in render(status, width)


@pytest.mark.parametrize(
    "flags", [["--local"], ["--route", "127.0.0.1:1"], ["--coordinator", "127.0.0.1:1"]]
)
def test_swarm_with_an_address_is_refused_in_one_line(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--swarm", "lab", *flags, "hi"])
    assert exit.value.code == 1
    assert capsys.readouterr().err == (
        f"nanoshard: error: --swarm chooses a coordinator found by mDNS; drop it with {flags[0]}\n"
    )


def test_generate_takes_openais_max_tokens_for_max_new_tokens() -> None:
    """``--max-tokens 5 x`` once read 5 as the prompt and refused "--max-tokens x"."""
    args = build_parser().parse_args(["generate", "--max-tokens", "5", "x"])
    assert (args.max_new_tokens, args.prompt) == (5, "x")
    # tour E: `generate -n 100 "JULIET:"` was refused as "unrecognized arguments: -n JULIET:"
    args = build_parser().parse_args(["generate", "-n", "7", "x"])
    assert (args.max_new_tokens, args.prompt) == (7, "x")


@pytest.mark.parametrize("tool", ["nanoshard", "nanoshard-node"])
def test_verbose_goes_before_or_after_the_command(tool: str) -> None:
    """Tour E: `nanoshard generate --verbose` was refused; only `nanoshard -v generate` was
    taken."""
    parser = build_parser() if tool == "nanoshard" else node_parser()
    command = ["generate", "x"] if tool == "nanoshard" else ["join"]
    for argv, verbose in (
        (command, False),
        (["-v", *command], True),
        ([*command, "-v"], True),
        ([*command, "--verbose"], True),
    ):
        assert parse_command_line(parser, argv).verbose is verbose, argv


def grouped_status() -> cpb.SwarmStatus:
    """Four nodes in two tensor-parallel groups of two, each serving the whole model; the
    second group's rank 1 still loading."""
    status = swarm_status()
    del status.nodes[:]
    n = GPT2.n_units
    for i in range(4):
        gid = f"5e1f00-v3-{i // 2}"
        members = [f"10.0.0.{2 * (i // 2) + k}:7961" for k in range(2)]
        loading = i == 3
        status.nodes.append(
            cpb.NodeStatus(
                node_id=f"{i:016x}",
                name=f"volunteer-{i}-laptop",
                address=f"10.0.0.{i}:7961",
                capacity=cpb.Capacity(device="cpu", dtype="fp32", memory_bytes=3 << 30),
                assignment=cpb.Assignment(
                    start=0,
                    end=n,
                    tp=cpb.TpGroup(
                        id=gid, rank=i % 2, size=2, members=members, rendezvous="10.0.0.0:1"
                    ),
                ),
                ready=not loading,
                ready_start=0,
                ready_end=0 if loading else n,
                healthy=not loading,
            )
        )
    for u in status.units:
        u.replicas = 1  # the first group; the second is still forming
    return status


@pytest.mark.parametrize("width", [80, 200])
def test_the_status_shows_each_nodes_group_and_each_groups_stage(width: int) -> None:
    status = grouped_status()
    for n in status.nodes:
        n.load.tp_link.CopyFrom(cpb.GroupLink(probe_ms=0.21, bytes_per_s=1.2e9, live_ms=0.35))
    out = render(status, width)
    assert max(len(line) for line in out.splitlines()) <= width
    flat = " ".join(out.split())
    for i in range(4):
        assert f"volunteer-{i}-laptop" in out
    assert "tp2 r0" in flat and "tp2 r1" in flat
    up = "group 5e1f00-v3-0 [0,14) up: volunteer-0-laptop r0, volunteer-1-laptop r1"
    forming = "group 5e1f00-v3-1 [0,14) forming: volunteer-2-laptop r0, volunteer-3-laptop r1"
    assert up in flat and forming in flat
    # a group's line breaks between its phrases only (tour D: "node-7f3a9c21\nr1")
    for phrase in ("volunteer-3-laptop r1", "all-reduce 0.21 ms at formation", "0.35 ms per"):
        assert phrase in out, out


def test_the_status_json_carries_each_nodes_group() -> None:
    from nanoshard.statusview import status_json

    nodes = status_json(grouped_status())["nodes"]
    link = {"probe_ms": 0.0, "bytes_per_s": 0.0, "live_ms": 0.0}  # (none measured)
    assert nodes[1]["tp"] == {"group": "5e1f00-v3-0", "rank": 1, "size": 2, "link": link}
    alone = status_json(swarm_status())["nodes"]
    assert all(n["tp"] == {"group": "", "rank": 0, "size": 1} for n in alone)


def test_the_status_json_says_each_nodes_health_in_the_tables_word() -> None:
    """Scripts could not tell a node loading its stage from a spare standing by."""
    from nanoshard.statusview import status_json

    status = swarm_status()
    words = [n["health"] for n in status_json(status)["nodes"]]
    table = render(status, width=160)
    assert words and all(re.search(rf"\b{w}\b", table) for w in words), (words, table)
    assert set(words) <= {"ok", "loading", "standby", "DOWN", "EXCLUDED"}


@pytest.mark.parametrize("value", ["8", "yes"])
def test_a_bad_tp_is_refused_in_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["coordinator", "--tp", value])
    assert exit.value.code == 1
    assert capsys.readouterr().err == (
        f"nanoshard: error: --tp must be one of auto, off, 2, 4, not {value!r}\n"
    )


# Mistakes a user made that once ended in a traceback, a hang or silence: each is now one
# line, and nothing starts. (argparse's own errors exit 2, ours 1.)
MISTAKES = [
    (["coordinator", "--heartbeat-interval", "0"], 2, "give a time above 0"),
    (["coordinator", "--heartbeat-interval", "3", "--heartbeat-timeout", "2"], 1, "longer than"),
    (["coordinator", "--port", "99999"], 2, "give 0 (any free one) to 65535"),
    (["status", "--coordinator", "localhost"], 2, "is not HOST:PORT"),
    (["status", "--coordinator", "[::1"], 2, "is not HOST:PORT"),
    (["api", "--max-body", "lots"], 2, "not a size: 'lots' (try 512M or 2G)"),
    (["api", "--codec", "bogus", "--coordinator", "127.0.0.1:1"], 2, "unknown codec 'bogus'"),
    (["generate", "--codec", "int9", "hi"], 2, "unknown codec 'int9'; valid codecs: fp32"),
    (["demo", "--codec", "int9"], 2, "unknown codec 'int9'"),
    (["generate", "--local", "--device", "tpu", "hi"], 1, "unknown device 'tpu'"),
    (["generate", "--local", "--stop", "", "hi"], 1, "--stop needs a text"),
    (["generate", "--coordinator", "127.0.0.1:1", "--model", "demo", "hi"], 1, "--model is for"),
    (["generate", "--route", "127.0.0.1:1", "--dtype", "int8", "hi"], 1, "for --local only"),
    (["generate", "--local", "--codec", "int8", "hi"], 1, "--codec: for a swarm or --route"),
    (
        ["generate", "--local", "--check-rate", "0", "--tls-ca", "x.pem", "hi"],
        1,
        "--check-rate, --tls-ca: for a swarm or --route",
    ),
    # (the generation's own options: checked before any swarm is looked for, named as flags)
    (
        ["generate", "--coordinator", "127.0.0.1:1", "--max-tokens", "0", "hi"],
        1,
        "--max-new-tokens",
    ),
    (["generate", "--coordinator", "127.0.0.1:1", "--top-p", "0", "hi"], 1, "--top-p must be in"),
    (["generate", "--coordinator", "127.0.0.1:1", "--top-k", "-1", "hi"], 1, "--top-k must be >="),
    (["generate", "--route", "127.0.0.1:1", "--temperature", "nan", "hi"], 1, "--temperature must"),
    (["generate", "--route", "127.0.0.1:1", "--check-rate", "5", "hi"], 2, "--check-rate: 5:"),
    (["api", "--check-rate", "nan"], 2, "argument --check-rate: nan: give a number in [0, 1]"),
    (["api", "--route-wait", "inf"], 2, "argument --route-wait: inf s: give a time above 0"),
    (["demo", "--nodes", "1000"], 1, "--nodes must be 1 to 32"),
    (["demo", "--temperature", "-1"], 1, "temperature must be in [0, 100]"),
    (["certs", "--hosts", "127.0.0.1", "--days", "99999999", "x"], 1, "--days must be 1 to"),
    (["status", "--coordinator", "127.0.0.1:1", "--tls-ca", "/"], 1, "TLS file / is a folder"),
    (
        ["status", "--swarm-key", "k" * 24, "--swarm-key-file", "/etc/hostname"],
        1,
        "give the swarm key once",
    ),
]


def test_generate_says_recoveries_after_the_text_not_in_it() -> None:
    """The session's warnings (a failed step, a new route looked for) go to stderr until
    the text begins; then the summary after the text reports the recovery."""
    started = False
    keep = quiet_once(lambda: started)

    def said(level: int) -> bool:
        return bool(keep(logging.LogRecord("nanoshard.client.session", level, "", 0, "", (), None)))

    assert said(logging.WARNING)  # (waiting for a route before any text: said)
    started = True
    assert not said(logging.WARNING) and not said(logging.INFO)
    assert said(logging.ERROR)


def test_a_prompt_is_read_from_stdin_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-`` reads the prompt from stdin; with no prompt at all, a piped one is not read, and
    the generation says so on stderr rather than continue an empty text without a word."""

    def generate(prompt: list[str], stdin: str) -> tuple[dict, str]:
        read, write = os.pipe()
        os.write(write, stdin.encode())
        os.close(write)
        with os.fdopen(read) as pipe:
            monkeypatch.setattr(sys, "stdin", pipe)
            greedy = ["--temperature", "0", "--max-new-tokens", "2", "--json"]
            with pytest.raises(SystemExit) as exit:
                main(["generate", "--local", *greedy, *prompt])
        out, err = capsys.readouterr()
        assert exit.value.code == 0, err
        return json.loads(out), err

    given, _ = generate(["ROMEO:"], "")
    piped, _ = generate(["-"], "ROMEO:")
    assert piped["prompt_token_ids"] == given["prompt_token_ids"], piped
    assert piped["token_ids"] == given["token_ids"]
    unread, err = generate([], "ROMEO:")
    assert "no prompt given" in err and "pass - as the prompt" in err, err
    assert unread["prompt_token_ids"] == generate([""], "")[0]["prompt_token_ids"]


def test_generate_ends_its_text_before_a_stop_string(capsys: pytest.CaptureFixture[str]) -> None:
    """``--stop``, as the SDK's ``stop`` and the API's: the text, streamed or whole, ends
    before the earliest stop string, and the generation stops there. (The CLI had none.)"""

    def generate(*flags: str) -> str:
        greedy = ["--temperature", "0", "--max-new-tokens", "40", "--local"]
        with pytest.raises(SystemExit) as exit:
            main(["generate", *greedy, *flags, "ROMEO:"])
        out, err = capsys.readouterr()
        assert exit.value.code == 0, err
        return out

    whole = json.loads(generate("--json"))
    text = whole["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # (a string from its middle)
    cut = json.loads(generate("--json", "--stop", stop, "--stop", "no such text"))
    assert cut["text"] == text[: text.index(stop)] and cut["stop_reason"] == "stop", (stop, cut)
    assert len(cut["token_ids"]) < len(whole["token_ids"])
    streamed = generate("--stop", stop)
    assert streamed.startswith("ROMEO:" + cut["text"] + "\n"), (streamed, cut["text"])
    assert stop not in streamed.split("\n[")[0].removeprefix("ROMEO:")


@pytest.mark.parametrize(("argv", "code", "says"), MISTAKES)
def test_a_mistake_is_one_line_and_starts_nothing(
    argv: list[str], code: int, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("nanoshard"), err


def test_a_nodes_memory_without_a_unit_is_taken_for_bytes_only_where_it_can_be(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--max-memory 500`` was 500 bytes, without a word: the node stood by, holding
    nothing. A number that small without a unit is refused; a larger one is bytes."""
    with pytest.raises(SystemExit) as exit:
        node_main(["join", "--max-memory", "500"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "nanoshard-node join: error: argument --max-memory: 500 bytes holds nothing: give a "
        "unit (500M, 2G, ...)"
    )
    assert memory_arg("4658858") == 4658858 and memory_arg("500K") == 500 << 10


@pytest.mark.parametrize(
    ("tool", "argv"),
    [
        ("nanoshard", ["api", "--max-body", "0"]),
        ("nanoshard-node", ["join", "--max-memory", "0"]),
        ("nanoshard-node", ["serve", "--units", "0:2", "--kv-memory", "0"]),
    ],
)
def test_a_size_that_must_hold_something_is_refused_at_start(
    tool: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """0 once started a gateway that refused every request (413), or a node that measured
    its machine before it said no."""
    with pytest.raises(SystemExit) as exit:
        {"nanoshard": main, "nanoshard-node": node_main}[tool](argv)
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last
        == f"{tool} {argv[0]}: error: argument {argv[-2]}: give a size above 0 (512K, 64M, 2G, ...)"
    )


@pytest.mark.parametrize(
    ("tool", "argv", "says"),
    [
        ("nanoshard", ["--bogus"], "unrecognized arguments: --bogus (see nanoshard --help)"),
        (
            "nanoshard",
            ["generate", "--bogus"],
            "unrecognized arguments: --bogus (see nanoshard generate --help)",
        ),
        ("nanoshard", ["frobnicate"], "invalid choice: 'frobnicate' (choose from 'generate',"),
        ("nanoshard", ["-v"], "give a command (see nanoshard --help)"),
        (
            "nanoshard-node",
            ["--bogus"],
            "unrecognized arguments: --bogus (see nanoshard-node --help)",
        ),
        (
            "nanoshard-node",
            ["join", "--bogus"],
            "unrecognized arguments: --bogus (see nanoshard-node join --help)",
        ),
        ("nanoshard-node", ["frobnicate"], "invalid choice: 'frobnicate' (choose from 'serve',"),
    ],
)
def test_an_unknown_option_or_command_is_named_in_one_line(
    tool: str, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown option before the command once read "the following arguments are
    required: command": the mistake is named, after argparse's usage lines, and nothing
    starts."""
    with pytest.raises(SystemExit) as exit:
        {"nanoshard": main, "nanoshard-node": node_main}[tool](argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    first, *wrapped, last = err.strip().splitlines()
    assert first.startswith(f"usage: {tool} [-h]"), err
    assert all(line.startswith(" ") for line in wrapped), err
    assert last.startswith(f"{tool}: error: ") and says in last, err


READY = re.compile(r"^nanoshard-node: ready: ")  # a volunteer's line once it serves
SIGNALLED = [  # a server's exit code after a clean stop, by the signal that asked for it
    pytest.param(signal.SIGINT, 130, id="ctrl-c"),
    pytest.param(signal.SIGTERM, 0, id="sigterm"),
]


def assert_interrupted_line(proc: Proc, tool: str, sig: int) -> None:
    """Ctrl-C's one line ends the output; a SIGTERM's clean stop has none."""
    said = [line for line in proc.lines if "interrupted" in line]
    if sig == signal.SIGINT:
        assert said == [f"{tool}: interrupted"] == proc.lines[-1:], proc.output
    else:
        assert not said, proc.output


def start_server(swarm: Swarm, server: str, cache: Path) -> Proc:
    """``server`` on loopback, mDNS off, once it has said it serves."""
    if server == "coordinator":
        return swarm.coordinator("--no-mdns")[0]
    if server == "serve":
        return swarm.node("demo", "0:8")[0]
    if server == "api":  # (it serves with no coordinator: its requests would wait for one)
        api = [str(BIN / "nanoshard"), "api", "--host", "127.0.0.1", "--port", "0"]
        proc = swarm.start([*api, "--coordinator", "127.0.0.1:1"])
        proc.wait_for(LISTENING)
        return proc
    _, address = swarm.coordinator("--no-mdns", "--replicas", "1")
    proc = swarm.join("--coordinator", address, "--no-mdns", "--max-memory", "256M",
                      "--cache-dir", str(cache))  # fmt: skip
    proc.wait_for(READY)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("server", ["coordinator", "api", "serve", "join"])
@pytest.mark.parametrize(("sig", "code"), SIGNALLED)
def test_a_server_stops_cleanly_with_130_on_ctrl_c_and_0_on_sigterm(
    server: str, sig: signal.Signals, code: int, tmp_path: Path
) -> None:
    """Ctrl-C ends a server as it ends any command, one line and 130; SIGTERM (docker
    stop, systemd) is how a server is meant to be stopped, so its clean stop is 0. The
    signal comes twice, as from an impatient user: the second changes nothing. (The
    coordinator and the nodes once ended 0 on both; the gateway was killed by SIGTERM, and
    printed a traceback at a second Ctrl-C.)"""
    with Swarm() as swarm:
        proc = start_server(swarm, server, tmp_path)
        proc.popen.send_signal(sig)
        time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):  # (it may have ended already)
            proc.popen.send_signal(sig)
        assert proc.wait(timeout=60) == code, proc.output
    assert "Traceback" not in proc.output, proc.output
    tool = "nanoshard-node" if server in ("serve", "join") else "nanoshard"
    assert_interrupted_line(proc, tool, sig)
    if server == "join":
        assert "left the swarm" in proc.output, proc.output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [
        pytest.param(signal.SIGINT, 130, "interrupted", id="ctrl-c"),
        pytest.param(signal.SIGTERM, 143, "terminated", id="sigterm"),
    ],
)
def test_status_watch_ends_on_a_signal_with_one_line(sig: int, code: int, said: str) -> None:
    """``status --watch`` refreshes until stopped: Ctrl-C or SIGTERM end it with one line,
    leaving the terminal as it was (SIGTERM once killed it mid-frame, its cursor hidden)."""
    with Swarm() as swarm:
        _, address = swarm.coordinator("--no-mdns")
        status = [str(BIN / "nanoshard"), "status", "--watch", "--coordinator", address]
        watch = swarm.start(status)
        lines = swarm.start([*status, "--json"])  # JSON Lines: an object a line, as they come
        wait_until("two frames", lambda: watch.output.count(" · placement v") >= 2, timeout=60)
        wait_until("two objects", lambda: len(lines.lines) >= 2, timeout=60)
        for proc in (watch, lines):
            proc.popen.send_signal(sig)
            assert proc.wait(timeout=30) == code, proc.output
    for proc in (watch, lines):
        assert proc.lines[-1] == f"nanoshard: {said}", proc.output
        assert "Traceback" not in proc.output, proc.output
    objects = [json.loads(line) for line in lines.lines[:-1]]
    assert len(objects) >= 2 and all(o["swarm"] == "default" for o in objects), lines.output


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), SIGNALLED)
def test_the_demo_stops_every_process_it_started_on_ctrl_c_and_on_sigterm(
    sig: signal.Signals, code: int
) -> None:
    """Signalled with its swarm up (``--keep``), the demo stops its coordinator, nodes and
    gateway, then ends as a server does. (SIGTERM once killed the demo alone: the processes
    it had started, each in a session of its own, ran on.) Signalled at a moment it polled
    for instead, the demo could be done already: its own stop has two children too. Before
    that, a node killed (a user trying what a vanishing volunteer does) is said, and the
    rest stay up: it once stopped the whole demo."""
    demo = Proc([str(BIN / "nanoshard"), "demo", "--nodes", "2", "--api-port", "0", "--keep"])
    parent = psutil.Process(demo.popen.pid)
    started: list[psutil.Process] = []
    try:
        kept = "the swarm keeps running"
        wait_until("the demo's swarm kept up", lambda: kept in demo.output, timeout=180)
        started = parent.children()
        assert len(started) == 4, started  # its coordinator, two nodes and gateway
        node = next(p for p in started if "node1" in p.cmdline())
        node.kill()
        left = "node1 exited with -9: the swarm goes on without it"
        wait_until("the demo to say node1 left", lambda: left in demo.output, timeout=30)
        assert demo.popen.poll() is None and len(parent.children()) == 3, demo.output
        demo.popen.send_signal(sig)
        assert demo.wait(timeout=60) == code, demo.output
        _, running = psutil.wait_procs(started, timeout=10)
        assert not running, running
    finally:  # (by PID, whatever failed: the demo, then what it started)
        with contextlib.suppress(psutil.NoSuchProcess):
            started += [c for c in parent.children() if c not in started]
        demo.kill()
        for child in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    assert "all demo processes stopped" in demo.output and "Traceback" not in demo.output
    assert "killed" not in demo.output  # they stopped on SIGTERM (they once had it blocked)
    assert_interrupted_line(demo, "nanoshard", sig)


@pytest.fixture
def long_model(tmp_path: Path) -> Path:
    """A random GPT-2 with a context of 1024 and GPT-2's vocabulary: a greedy generation of
    1000 tokens takes seconds, where the demo model's whole context takes under one."""
    config = GPTConfig(block_size=1024, vocab_size=50257, n_layer=2, n_head=4, n_embd=256)
    save_hf_checkpoint(config, init_weights(config, seed=0), tmp_path / "long")
    return tmp_path / "long"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [
        pytest.param(signal.SIGINT, 130, "interrupted", id="ctrl-c"),
        pytest.param(signal.SIGTERM, 143, "terminated", id="sigterm"),
    ],
)
def test_a_generation_stopped_by_a_signal_closes_its_session(
    sig: signal.Signals, code: int, said: str, long_model: Path
) -> None:
    """``generate`` stopped by Ctrl-C or SIGTERM (kill, ``timeout``, a supervisor) in the
    middle of a generation closes its session on its node before it ends, so the node's KV
    memory is free at once, not at the session's TTL (300 s). The node is stopped while the
    command is signalled, so the generation cannot end by itself first (it has seconds
    to go when the session is seen open; the open itself may not have been answered yet).
    (SIGTERM once ended the command where it stood, and a client interrupted while its open
    was unanswered never closed the session.)"""
    with Swarm() as swarm:
        node, address = swarm.node(str(long_model), "0:4")
        channel = grpc.insecure_channel(address)
        info = pb_grpc.NodeStub(channel).Info
        sessions = lambda: info(pb.InfoRequest(), timeout=10).sessions  # noqa: E731
        greedy = ["--max-new-tokens", "1000", "--temperature", "0", "--model", str(long_model)]
        command = [str(BIN / "nanoshard"), "generate", "--route", address, *greedy, "ROMEO:"]
        generate = swarm.start(command)
        wait_until("the generation's session open", lambda: sessions() == 1, every=0.01)
        node.popen.send_signal(signal.SIGSTOP)
        try:
            assert generate.popen.poll() is None, generate.output  # it waits on the node
            generate.popen.send_signal(sig)
        finally:
            node.popen.send_signal(signal.SIGCONT)
        assert generate.wait(timeout=60) == code, generate.output
        assert generate.lines[-1] == f"nanoshard: {said}", generate.output
        wait_until("the session closed", lambda: sessions() == 0, timeout=30)
        channel.close()
    assert "Traceback" not in generate.output, generate.output


def test_a_port_in_use_is_one_line(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for argv in (
            ["coordinator", "--host", "127.0.0.1", "--port", port, "--no-mdns"],
            ["api", "--coordinator", "127.0.0.1:1", "--port", port],
        ):
            with pytest.raises(SystemExit) as exit:
                main(argv)
            assert exit.value.code == 1
            err = capsys.readouterr().err
            assert "Traceback" not in err and f"127.0.0.1:{port}" in err, err
            assert "in use" in err.strip().splitlines()[-1], err
            # (said before the model is read)
            assert not [r for r in caplog.records if "hashing" in r.getMessage()], err


@pytest.mark.parametrize("host", ["127.0.0.1", "nonsense.invalid"])
def test_an_address_it_cannot_listen_on_is_our_one_line_not_grpcs_log_first(host: str) -> None:
    """gRPC's C core prints its own "add_port.cc ... Failed to add port" line when a bind
    fails (a port in use, a host name that does not resolve): the address is asked of the
    OS first, so the user reads only nanoshard's line."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1]) if host == "127.0.0.1" else "0"
        serve = [str(BIN / "nanoshard-node"), "serve", "--model", "demo", "--units", "0:8"]
        done = subprocess.run(
            [*serve, "--host", host, "--port", port],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1, done.stderr
    assert "add_port" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    why = "the port is in use" if host == "127.0.0.1" else "the host name does not resolve ("
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nanoshard-node: error: cannot listen on {host}:{port}: {why}"), last


@pytest.fixture
def web_server() -> Iterator[str]:
    """An HTTP/1.x server on loopback (what `nanoshard api` or any web server answers)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_web_servers_port_given_for_the_coordinators_is_one_line_not_a_retry_loop(
    web_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone gives the HTTP API's port where the coordinator's goes: it answers, so it is
    not "unreachable" and waiting will not help. Each command says so and stops."""
    with pytest.raises(SystemExit) as exit:
        main(["status", "--coordinator", web_server])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"nanoshard: error: the coordinator at {web_server}: it answers"), err
    assert "not in gRPC" in err and "Traceback" not in err, err
    join = [str(BIN / "nanoshard-node"), "join", "--coordinator", web_server]
    join += ["--mdns-interface", "127.0.0.1"]  # (it stops before advertising anything)
    done = subprocess.run(
        [*join, "--max-memory", "200M"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nanoshard-node: error: {web_server}: it answers"), done.stderr


def test_join_pointed_at_a_nodes_port_says_so_and_stops() -> None:
    """A node answers gRPC, but not the coordinator's calls: one line, no retry loop."""
    with Swarm() as swarm:
        _, node = swarm.node("demo", "0:8")
        join = [str(BIN / "nanoshard-node"), "join", "--coordinator", node, "--no-mdns"]
        done = subprocess.run(
            [*join, "--max-memory", "200M"], capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nanoshard-node: error: {node}: it does not serve this call"), last


def test_join_warns_of_more_max_memory_than_the_machine_has() -> None:
    """`--max-memory 100T` was taken without a word on a 24 GiB machine (and promised)."""
    with Swarm() as swarm:
        _, node = swarm.node("demo", "0:8")  # (a coordinator that is not: the join ends)
        join = [str(BIN / "nanoshard-node"), "join", "--coordinator", node, "--no-mdns"]
        done = subprocess.run(
            [*join, "--max-memory", "100T"], capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1, done.stderr
    assert "--max-memory 100.0 TiB is more than this machine's memory" in done.stderr


def test_a_tls_file_that_is_not_pem_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(SystemExit) as exit:
        main(["status", "--coordinator", "127.0.0.1:1", "--tls-ca", str(junk)])
    assert exit.value.code == 1
    assert capsys.readouterr().err == f"nanoshard: error: {junk} is not a certificate in PEM\n"


def test_a_tls_key_of_another_certificate_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for folder in ("one", "two"):
        with pytest.raises(SystemExit) as made:
            main(["certs", str(tmp_path / folder), "--hosts", "127.0.0.1"])
        assert made.value.code == 0
    cert, key = tmp_path / "one" / "127.0.0.1.pem", tmp_path / "two" / "127.0.0.1.key"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main(["coordinator", "--no-mdns", "--tls-cert", str(cert), "--tls-key", str(key)])
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err == f"nanoshard: error: {key} is not the private key of the certificate {cert}\n"


def test_a_swarm_key_file_that_is_not_text_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    binary = tmp_path / "swarm.key"
    binary.write_bytes(bytes(range(200, 256)))
    with pytest.raises(SystemExit) as exit:
        main(["status", "--coordinator", "127.0.0.1:1", "--swarm-key-file", str(binary)])
    assert exit.value.code == 1
    assert capsys.readouterr().err.startswith(
        f"nanoshard: error: the swarm key file {binary} is not text (UTF-8)"
    )


def test_a_spot_check_names_its_nodes_as_the_hop_lines_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Spot-check lines named nodes by address, the hop lines by name."""
    from argparse import Namespace

    from nanoshard.cli.generate import report
    from nanoshard.client.checks import CheckResult
    from nanoshard.client.sdk import GenerationResult
    from nanoshard.trace import trace_to_dict

    trace = trace_to_dict(pb.HopTrace(node="n3", address="127.0.0.1:46041", start=6, end=8))
    result = GenerationResult("!", [0], [1, 2], "max_new_tokens", 1.0, [], steps=[[trace]])
    check = CheckResult(6, 8, 4, 1, "127.0.0.1:46041", {"127.0.0.1:5": 0.0}, 1e-5)
    report(result, Namespace(json=False), False, [check])
    err = capsys.readouterr().err
    assert "spot-check of n3 (127.0.0.1:46041), units [6, 8) at position 4: agree" in err
    assert "(127.0.0.1:5 0;" in err  # (a shadow that computed no step: its address)


def test_a_generation_a_node_excluded_for_lying_computed_ends_with_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from argparse import Namespace

    from nanoshard.cli.generate import UNTRUSTED, report
    from nanoshard.client.sdk import GenerationResult

    result = GenerationResult("!", [0], [1, 2], "max_new_tokens", 1.0, [])
    report(result, Namespace(json=False), True, [], {"127.0.0.1:9": 2})
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "warning: spot-checks got 127.0.0.1:9 excluded for lying (the coordinator's re-run "
        "contradicted what it signed): the text from generated token 3 on went through it "
        "and may be wrong; run the prompt again"
    )
    report(result, Namespace(json=True), True, [], {"127.0.0.1:9": 2})
    assert '"excluded": {"127.0.0.1:9": 2}' in capsys.readouterr().out
    assert UNTRUSTED not in (0, 1, 2, 130)  # an exit code of its own
