"""``nanoshard generate``: through the swarm, along a fixed route, or in this process."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from collections.abc import Callable

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.checks import DEFAULT_CHECK_RATE, CheckResult
from nanoshard.client.sdk import Client, GenerationResult, Token
from nanoshard.cliutil import interruptible
from nanoshard.engine import parse_dtype, pick_device
from nanoshard.errors import InvalidArgument
from nanoshard.generation import STOP_NOTES, LocalSession, check_prompt, generate, max_length_for
from nanoshard.sampling import SamplingParams
from nanoshard.security import read_key
from nanoshard.textstream import TextStream, final_text
from nanoshard.tokenizer import encoding_for, prompt_ids

DEFAULT_MODEL = "demo"  # of --local and --route: the built-in model
UNTRUSTED = 3  # the exit code of a generation part of which a node excluded for lying computed


def generate_locally(
    args: argparse.Namespace, on_token: Callable[[Token], object] | None
) -> GenerationResult:
    """The reference path: the whole model in this process, the same loop as the swarm's."""
    checkpoint = open_checkpoint(
        args.model or DEFAULT_MODEL, trust_pickle=args.trust_pickle, revision=args.revision
    )
    config = checkpoint.config
    enc = encoding_for(checkpoint.path)
    ids = prompt_ids(enc, args.prompt or "", config.vocab_size)
    check_prompt(ids, config.vocab_size, config.block_size)
    stage = checkpoint.load_stage(
        0, config.n_units, parse_dtype(args.dtype), pick_device(args.device)
    )
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    session = LocalSession(
        stage, params, max_length_for(len(ids), args.max_new_tokens, config.block_size)
    )
    eot = enc.eot_token if "<|endoftext|>" in enc.special_tokens_set else None
    stops = args.stop or []
    texts = TextStream(stops)  # (as the SDK streams its text: see textstream.py)

    def each_token(token: int) -> bool:
        text = texts.push(enc.decode_single_token_bytes(token))
        if on_token is not None and text:
            on_token(Token(token, text))
        return texts.stopped

    gen = generate(
        session,
        ids,
        args.max_new_tokens,
        block_size=config.block_size,
        eot_id=eot,
        on_token=each_token,
    )
    if on_token is not None and gen.token_ids and (rest := texts.finish()):
        on_token(Token(gen.token_ids[-1], rest))  # (what could have begun a stop string)
    return GenerationResult(
        text=final_text(b"".join(map(enc.decode_single_token_bytes, gen.token_ids)), stops),
        token_ids=gen.token_ids,
        prompt_token_ids=gen.prompt_token_ids,
        stop_reason=gen.stop_reason,
        ttft_ms=gen.prefill_ms,
        token_ms=gen.decode_ms,
    )


def generate_on_nodes(
    args: argparse.Namespace, on_token: Callable[[Token], object] | None
) -> tuple[GenerationResult, list[CheckResult], dict[str, int]]:
    """Through the swarm (or ``--route``'s nodes): the result, the spot-checks run, and the
    nodes of the result they got excluded (``Client.excluded``)."""
    route = [a.strip() for a in args.route.split(",") if a.strip()] if args.route else None
    if args.route is not None and not route:
        raise InvalidArgument("--route needs at least one HOST:PORT")
    with Client(
        args.coordinator,
        route=route,
        model=args.model or DEFAULT_MODEL,
        mdns_interfaces=args.mdns_interfaces,
        swarm=args.swarm,
        codec=args.codec,
        swarm_key=read_key(args.swarm_key, args.swarm_key_file),
        tls_ca=args.tls_ca,
        check_rate=args.check_rate,
    ) as client:
        if args.coordinator is None and route is None and not args.json:
            # whose swarm the prompt goes to (without --swarm: the first mDNS found)
            which = "" if args.swarm else ": the first swarm that answered (--swarm NAME chooses)"
            print(f"[coordinator {client.coordinator}, found by mDNS{which}]", file=sys.stderr)
        result = client.generate(
            args.prompt,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
            on_token=on_token,
        )
        checks = client.wait_for_checks()
        return result, checks, client.excluded(result)


def read_prompt(prompt: str | None) -> str:
    """The text to continue: the argument as given, stdin's text (as it is) for ``-``. With
    none, an empty text (a generation from <|endoftext|>), said on stderr when stdin is a
    pipe or a file: it is read only when asked, so a prompt piped in by mistake is not lost
    without a word."""
    if prompt == "-":
        return sys.stdin.read()
    if prompt is None:
        if _stdin_holds_data():
            print(
                "nanoshard: no prompt given: generating from an empty text "
                "(pass - as the prompt to read it from stdin)",
                file=sys.stderr,
            )
        return ""
    return prompt


def _stdin_holds_data() -> bool:
    try:
        info = os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):  # (closed, or not a file)
        return False
    return stat.S_ISFIFO(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_size > 0)


def check_options(args: argparse.Namespace) -> None:
    """The generation's own options, checked before any swarm is looked for (which can take
    seconds), and named by their flags."""
    if args.max_new_tokens < 1:
        raise InvalidArgument(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.stop is not None and not all(args.stop):
        raise InvalidArgument(
            "--stop needs a text: an empty one would stop every generation at once"
        )
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except InvalidArgument as exc:  # (its messages start with the field's name)
        name, _, rest = str(exc).partition(" ")
        raise InvalidArgument(f"--{name.replace('_', '-')} {rest}") from None


def quiet_once(started: Callable[[], bool]) -> Callable[[logging.LogRecord], bool]:
    """A log filter for the client's session: its warnings (a failed step, a new route
    looked for) are said until the text has ``started``, and then left to the summary's
    recoveries after the text, not written mid-line in it; errors always."""
    return lambda record: not started() or record.levelno >= logging.ERROR


def cmd_generate(args: argparse.Namespace) -> int:
    interruptible()  # a generation stopped by a signal closes its session on its nodes
    check_options(args)
    args.prompt = read_prompt(args.prompt)
    started = False
    if not args.verbose:  # (every check is reported after the text: not mid-line in it)
        logging.getLogger("nanoshard.client.checks").setLevel(logging.ERROR)
        logging.getLogger("nanoshard.client.session").addFilter(quiet_once(lambda: started))

    def show(token: Token) -> None:
        nonlocal started
        if not started:  # the prompt, once the request is known to be good
            sys.stdout.write(args.prompt)
            started = True
        sys.stdout.write(token.text)
        sys.stdout.flush()

    on_token = None if args.json else show
    checks: list[CheckResult] = []
    excluded: dict[str, int] = {}
    if args.model is not None and not (args.local or args.route):
        raise InvalidArgument(
            "--model is for --local and --route: a swarm serves its coordinator's model "
            "(see nanoshard status)"
        )
    local_only = {
        "--device": args.device != "auto",
        "--dtype": args.dtype != "fp32",
        "--trust-pickle": args.trust_pickle,
    }
    nodes_only = {
        "--codec": args.codec != "fp32",
        "--check-rate": args.check_rate != DEFAULT_CHECK_RATE,
        "--mdns-interface": args.mdns_interfaces is not None,
        "--swarm": args.swarm is not None,
        "--swarm-key": args.swarm_key is not None,
        "--swarm-key-file": args.swarm_key_file is not None,
        "--tls-ca": args.tls_ca is not None,
    }
    if args.local:
        refuse_flags(nodes_only, "for a swarm or --route, not --local (no node is asked)")
    else:
        refuse_flags(local_only, "for --local only (the nodes choose their own)")
    try:
        if args.local:
            result = generate_locally(args, on_token)
        else:
            result, checks, excluded = generate_on_nodes(args, on_token)
    except BaseException:
        if started:  # an error or Ctrl-C mid-stream starts its own line, after the text
            sys.stdout.write("\n")
            sys.stdout.flush()
        raise
    report(result, args, with_hops=not args.local, checks=checks, excluded=excluded)
    return UNTRUSTED if excluded else 0


def refuse_flags(given: dict[str, bool], why: str) -> None:
    """A one-line error naming every flag of ``given`` that was set, if any was."""
    if named := [flag for flag, on in given.items() if on]:
        raise InvalidArgument(f"{', '.join(named)}: {why}")


def report(
    result: GenerationResult,
    args: argparse.Namespace,
    with_hops: bool,
    checks: list[CheckResult],
    excluded: dict[str, int] | None = None,
) -> None:
    out = result.to_dict()
    if not with_hops:
        del out["hops"]
    else:
        out["checks"] = [c.to_dict() for c in checks]
        out["excluded"] = excluded or {}
    if args.json:
        print(json.dumps(out))
        return
    sys.stdout.write("\n")
    mean = out["timings"]["decode_ms_mean"]
    print(
        f"[{len(result.token_ids)} tokens, {STOP_NOTES.get(result.stop_reason, result.stop_reason)}; "
        f"prefill {result.ttft_ms:.1f} ms"
        + (f", decode {mean:.1f} ms/token]" if mean is not None else "]"),
        file=sys.stderr,
    )
    for r in result.recoveries:
        print(
            f"  recovered at position {r.pos}: {r.kind} ({r.detail}), {r.ms:.0f} ms",
            file=sys.stderr,
        )
    names = {t["address"]: t["node"] for traces in result.steps for t in traces if t["node"]}

    def who(address: str) -> str:  # (a node by its name, as the hop lines below say it)
        return f"{names[address]} ({address})" if address in names else address

    for c in checks:
        verdict = "agree" if c.agree else "DISAGREE"
        distances = ", ".join(f"{who(a)} {d:.2g}" for a, d in c.distances.items())
        print(
            f"  spot-check of {who(c.checked)}, units [{c.start}, {c.end}) at position {c.pos}: "
            f"{verdict} ({distances}; tolerance {c.tolerance:.2g})",
            file=sys.stderr,
        )
    for row in out.get("hops", []):
        print(
            f"  {row['node']} units [{row['units'][0]}, {row['units'][1]}): compute "
            f"{row['compute_ms']:.1f} ms, queue {row['queue_ms']:.1f} ms, transfer "
            f"{row['transfer_ms']:.1f} ms, {row['bytes_out']} bytes out ({row['codec']})",
            file=sys.stderr,
        )
    for address, k in (excluded or {}).items():
        print(
            f"warning: spot-checks got {address} excluded for lying (the coordinator's re-run "
            f"contradicted what it signed): the text from generated token {k + 1} on went "
            "through it and may be wrong; run the prompt again",
            file=sys.stderr,
        )
