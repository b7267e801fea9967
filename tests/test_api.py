"""``nanoshard api`` against a real swarm on loopback, spoken to by the official ``openai``
package (and by raw HTTP where a client would hide what is tested): models, completions
whole and streamed, chat, determinism against the CLI, every error status, a client that
leaves mid-stream, a node killed mid-stream, and the web view in headless Chromium.

One swarm for the module (CI time): a coordinator with --replicas 2 and four volunteers
that each hold about half the model (every quota of theirs: sessions of at most
QUOTA_LENGTH positions), and one gateway. A test that changes the swarm puts it back.
"""

from __future__ import annotations

import http.client
import json
import re
import secrets
import shutil
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from swarm import BIN, Proc, Swarm, nanoshard, settled, wait_until
from test_swarm import HEARTBEAT, demo_bytes

from nanoshard.checkpoint import open_checkpoint
from nanoshard.client.swarm import CoordinatorClient
from nanoshard.cliutil import API, listening_pattern
from nanoshard.statusview import status_json
from nanoshard.tokenizer import encoding_for

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

DATA_PLANE = re.compile(r"data plane on (\S+)")
GATEWAY = listening_pattern(API)
PROMPT = "ROMEO:\n"
QUOTA_LENGTH = 250  # positions a session may reserve on every node (a request past it: 429)
MAX_BODY = 64 * 1024  # the gateway's body limit in these tests (past it: 413)


class ApiSwarm:
    def __init__(self, swarm: Swarm, tmp: Path) -> None:
        self.swarm, self.tmp = swarm, tmp
        self.name = "api" + secrets.token_hex(4)
        self.memory = str(int(demo_bytes() * 0.75 / 0.8))  # two chains of two hops fit
        _, self.address = swarm.coordinator("--swarm", self.name, "--replicas", "2", *HEARTBEAT)
        self.nodes: dict[str, Proc] = {}
        self.count = 0
        for _ in range(4):
            self.add()
        self.gateway = self.start_gateway(self.address)
        self.url = self.gateway.wait_for(GATEWAY).group(1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def start_gateway(self, coordinator: str, *extra: str) -> Proc:
        return self.swarm.start(
            [
                str(BIN / "nanoshard"),
                "api",
                "--coordinator",
                coordinator,
                "--port",
                "0",
                "--check-rate",
                "0",  # no spot-check sessions: the nodes hold exactly the requests' sessions
                "--route-wait",
                "3",
                "--max-body",
                str(MAX_BODY),
                *extra,
            ]
        )

    def add(self, name: str | None = None) -> Proc:
        self.count += 1
        proc = self.swarm.join(
            "--swarm",
            self.name,
            "--coordinator",
            self.address,
            "--max-memory",
            self.memory,
            "--cache-dir",
            str(self.tmp / f"n{self.count}"),
            "--name",
            name or f"n{self.count}",
            "--quota-max-length",
            str(QUOTA_LENGTH),
        )
        self.nodes[proc.wait_for(DATA_PLANE).group(1)] = proc
        return proc

    def status(self) -> dict[str, Any]:
        coordinator = CoordinatorClient(self.address)
        try:
            return status_json(coordinator.status())
        finally:
            coordinator.close()

    def ready(self, nodes: int = 4) -> dict[str, Any]:
        """The swarm at rest: ``nodes`` nodes serving what placement gave them, two of them
        for every unit, and no session open anywhere."""

        def check() -> dict[str, Any] | None:
            status = settled(self.status(), nodes=nodes, replicas=2)
            if status is None or any(n["sessions"] for n in status["nodes"]):
                return None
            return status

        return wait_until(f"{nodes} nodes at rest, every unit twice", check, timeout=120)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(self.url + "/metrics", timeout=10).read().decode()
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    with Swarm() as swarm:
        yield ApiSwarm(swarm, tmp_path_factory.mktemp("api"))


def post(url: str, body: bytes, path: str = "/v1/completions") -> tuple[int, dict]:
    request = urllib.request.Request(
        url + path, data=body, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def cli(api: ApiSwarm, *args: str) -> dict[str, Any]:
    done = nanoshard("generate", "--coordinator", api.address, "--json", *args, PROMPT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_models_list(api: ApiSwarm) -> None:
    api.ready()
    assert [m.id for m in api.client.models.list().data] == ["demo"]


def test_greedy_and_seeded_completions_equal_the_cli(api: ApiSwarm) -> None:
    api.ready()
    for flags, params in [
        (["--temperature", "0"], {"temperature": 0}),
        (
            ["--temperature", "0.9", "--top-p", "0.95", "--seed", "11"],
            {"temperature": 0.9, "top_p": 0.95, "seed": 11},
        ),
    ]:
        reference = cli(api, "--max-new-tokens", "40", *flags)
        whole = api.client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, **params)
        again = api.client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, **params)
        assert whole.choices[0].text == again.choices[0].text == reference["text"]
        assert whole.usage.prompt_tokens == len(reference["prompt_token_ids"])
        assert whole.usage.completion_tokens == len(reference["token_ids"])
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + len(reference["token_ids"])
        expected = "length" if reference["stop_reason"] == "max_new_tokens" else "stop"
        assert whole.choices[0].finish_reason == expected


def test_a_streamed_completion_equals_the_whole_one(api: ApiSwarm) -> None:
    api.ready()
    params = {"model": "demo", "prompt": PROMPT, "max_tokens": 60, "temperature": 0.8, "seed": 3}
    whole = api.client.completions.create(**params)
    chunks = list(
        api.client.completions.create(**params, stream=True, stream_options={"include_usage": True})
    )
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # A stop string that spans tokens: the text ends before it, streamed or not.
    stop = whole.choices[0].text[12:17]
    cut = whole.choices[0].text[: whole.choices[0].text.index(stop)]
    stopped = api.client.completions.create(**params, stop=[stop, "#never#"])
    streamed = api.client.completions.create(**params, stop=[stop, "#never#"], stream=True)
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_a_streamed_chat(api: ApiSwarm) -> None:
    api.ready()
    messages = [{"role": "user", "content": "Who is there?"}]
    params = {"model": "demo", "messages": messages, "max_tokens": 40, "seed": 5}
    whole = api.client.chat.completions.create(**params)
    chunks = list(api.client.chat.completions.create(**params, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content and "\n\n" not in text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # usage counts the rendered template's tokens (README: "Chat template")
    rendered = "USER:\nWho is there?\n\nASSISTANT:\n"
    plain = api.client.completions.create(
        model="demo", prompt=rendered, max_tokens=40, seed=5, stop="\n\n"
    )
    assert plain.choices[0].text == text
    assert whole.usage.prompt_tokens == plain.usage.prompt_tokens
    # A message's "<|endoftext|>" is its text (it inserted the end of a document into the
    # rendered prompt); a completion's text prompt may still hold that token.
    enc = encoding_for(open_checkpoint("demo").path)
    rendered = "USER:\n<|endoftext|>\n\nASSISTANT:\n"
    said = [{"role": "user", "content": "<|endoftext|>"}]
    chat = api.client.chat.completions.create(model="demo", messages=said, max_tokens=1)
    assert chat.usage.prompt_tokens == len(enc.encode(rendered, disallowed_special=()))
    plain = api.client.completions.create(model="demo", prompt=rendered, max_tokens=1)
    assert plain.usage.prompt_tokens == len(enc.encode(rendered, allowed_special="all"))
    assert plain.usage.prompt_tokens < chat.usage.prompt_tokens


def test_every_error_has_its_status(api: ApiSwarm) -> None:
    api.ready()
    c = api.client
    for bad in [{"max_tokens": -1}, {"temperature": 2.5}, {"top_p": 0}, {"n": 2}]:
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model="demo", prompt=PROMPT, **bad)
        assert err.value.body["param"] == next(iter(bad))
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="demo", messages=[])
    status, body = post(api.url, b'{"model": "demo", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:  # longer than the model's context
        c.completions.create(model="demo", prompt=[1] * 300)
    assert "context" in err.value.body["message"]
    assert (err.value.body["param"], err.value.body["code"]) == ("prompt", "invalid_value")
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="gpt-4", prompt=PROMPT)
    assert err.value.body["code"] == "model_not_found"
    status, body = post(api.url, json.dumps({"model": "demo", "prompt": "x" * MAX_BODY}).encode())
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    # 255 new tokens reserve the whole context: more than any node's quota allows
    with pytest.raises(openai.RateLimitError) as err:
        c.completions.create(model="demo", prompt=PROMPT, max_tokens=255)
    assert f"max_length per session is {QUOTA_LENGTH}" in err.value.body["message"]


def test_503_when_the_swarm_cannot_serve(api: ApiSwarm) -> None:
    """A coordinator with no node (every unit uncovered), then no coordinator at all."""
    name = "empty" + secrets.token_hex(3)
    lonely, address = api.swarm.coordinator("--swarm", name, *HEARTBEAT)
    gateway = api.start_gateway(address, "--route-wait", "1")
    url = gateway.wait_for(GATEWAY).group(1)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=5)
    assert err.value.status_code == 503
    assert "no ready node serves units" in err.value.body["message"], err.value.body
    lonely.kill()
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="demo", prompt=PROMPT, max_tokens=5)
    assert err.value.status_code == 503 and err.value.body["code"] == "swarm_unavailable"
    gateway.kill(signal.SIGTERM)


def test_a_client_that_leaves_mid_stream_closes_its_session(api: ApiSwarm) -> None:
    api.ready()
    left = api.metric("nanoshard_api_disconnects_total")
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 240, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body), {"content-type": "json"})
    reply = connection.getresponse()
    assert reply.status == 200
    assert reply.readline().startswith(b"data: {")  # the first token: the session is open
    connection.close()  # the client leaves, 239 tokens early
    # The gateway saw it leave before the generation ended and cancelled it ...
    wait_until(
        "the gateway to cancel the stream",
        lambda: (
            api.metric("nanoshard_api_disconnects_total") == left + 1
            and api.metric("nanoshard_api_generations_active") == 0
        ),
    )
    # ... and the session it held on every hop is closed: the nodes say so.
    wait_until(
        "no session open on any node",
        lambda: all(n["sessions"] == 0 for n in api.status()["nodes"]),
    )


def test_a_gateway_stopped_mid_stream_says_so_and_closes_its_sessions(api: ApiSwarm) -> None:
    """Ctrl-C on `nanoshard api` with a stream open: the stream ends on an error event
    (OpenAI's client raises it), not as if the text were whole, and the generation's
    session closes on every node. (240 tokens take seconds here; the gateway notices its
    stop within half a second.)"""
    api.ready()
    gateway = api.start_gateway(api.address)
    url = gateway.wait_for(GATEWAY).group(1)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    stream = client.completions.create(model="demo", prompt=PROMPT, max_tokens=240, stream=True)
    chunks = 0
    with pytest.raises(openai.APIError, match="gateway is shutting down"):
        for _ in stream:
            chunks += 1
            if chunks == 1:  # the session is open on every hop
                gateway.popen.send_signal(signal.SIGINT)
    assert 1 <= chunks < 240
    assert gateway.popen.wait(timeout=60) == 130, gateway.output  # (as Ctrl-C ends any command)
    wait_until(
        "no session open on any node",
        lambda: all(n["sessions"] == 0 for n in api.status()["nodes"]),
    )


def test_a_gateway_stopped_mid_completion_answers_at_once_and_closes_its_session(
    api: ApiSwarm,
) -> None:
    """Ctrl-C on `nanoshard api` while a whole (not streamed) completion runs: the request
    is answered 503 saying so, not held until its 240 tokens are done, the gateway ends as
    Ctrl-C ends any command, and the generation's session closes on every node."""
    api.ready()
    gateway = api.start_gateway(api.address)
    url = gateway.wait_for(GATEWAY).group(1)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    outcome: list[object] = []

    def complete() -> None:
        try:
            outcome.append(client.completions.create(model="demo", prompt=PROMPT, max_tokens=240))
        except openai.APIError as exc:
            outcome.append(exc)

    request = threading.Thread(target=complete)
    request.start()
    wait_until(  # its first token came back: the session is open on every hop
        "the completion's first token",
        lambda: re.search(r"nanoshard_api_time_to_first_token_seconds_count 1\.0", metrics(url)),
        every=0.02,
    )
    gateway.popen.send_signal(signal.SIGINT)
    request.join(timeout=60)
    assert not request.is_alive()
    (answer,) = outcome
    assert isinstance(answer, openai.APIStatusError), answer
    assert answer.status_code == 503 and "gateway is shutting down" in str(answer)
    assert gateway.popen.wait(timeout=60) == 130, gateway.output
    wait_until(
        "no session open on any node",
        lambda: all(n["sessions"] == 0 for n in api.status()["nodes"]),
    )


def metrics(url: str) -> str:
    return urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()


def test_a_node_killed_mid_stream_costs_only_time(api: ApiSwarm) -> None:
    api.ready()
    params = {"model": "demo", "prompt": PROMPT, "max_tokens": 150, "temperature": 0.9, "seed": 8}
    reference = api.client.completions.create(**params)
    api.ready()
    stream = api.client.completions.create(
        **params, stream=True, extra_body={"nanoshard": {"hops": True}}
    )
    text, victim, hops_seen = [], None, 0
    for chunk in stream:
        extension = (chunk.model_extra or {}).get("nanoshard")
        if extension:
            hops_seen += 1
            if hops_seen == 10:  # the first hop's node, SIGKILLed mid-generation
                address = extension["hops"][0]["address"]
                victim = api.nodes.pop(address)
                victim.kill()
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason
    assert victim is not None and victim.popen.poll() is not None
    assert "".join(text) == reference.choices[0].text
    assert finish == reference.choices[0].finish_reason
    metrics = urllib.request.urlopen(api.url + "/metrics", timeout=10).read().decode()
    assert re.search(r'nanoshard_api_recoveries_total\{kind="(repair|reroute)"\} [1-9]', metrics)
    api.add()  # back to four


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_web_view_shows_the_swarm_live(api: ApiSwarm, tmp_path: Path) -> None:
    """In a real headless Chromium (Debian's), driven over the DevTools protocol by
    Playwright's Python package: it has explicit waits on page state (wait_for_function),
    and launches a browser it did not download (executable_path), where selenium would
    need a matching chromedriver as well."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no chromium on PATH: apt-get install -y chromium (.ci/run does)")
    api.ready()
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        except sync_api.Error as exc:  # the browser cannot start here (not our page's fault)
            pytest.skip(f"{browser_path} does not start headless: {exc}")
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(api.url + "/")
            shown = (
                "Object.fromEntries([...document.querySelectorAll('[data-node]')]"
                ".map(e => [e.dataset.node, e.dataset.stage]))"
            )

            def page_shows_the_swarm() -> dict[str, str] | None:
                """The nodes and stages, when the page shows them as the coordinator does
                now (placement may move a stage meanwhile, on a busy machine)."""
                now = {n["name"]: f"{n['stage'][0]}:{n['stage'][1]}" for n in api.status()["nodes"]}  # fmt: skip
                return now if page.evaluate(shown) == now else None

            expected = wait_until("the page to show every node and its stage", page_shows_the_swarm)  # fmt: skip
            for name, stage in expected.items():
                start, end = map(int, stage.split(":"))
                card = page.inner_text(f"[data-node='{name}']")
                assert f"[{start}, {end})" in card, card
                # (in the words of nanoshard status)
                assert page.get_attribute(f"[data-node='{name}']", "data-health") == "ok"
            # A prompt streamed through the API, each token marked with its nodes.
            page.fill("#max_tokens", "20")
            page.click("#go")
            page.wait_for_function("document.querySelectorAll('#output span.tok').length > 0")
            page.wait_for_function("!document.getElementById('go').disabled")
            hops = page.get_attribute("#output span.tok", "data-hops")
            assert any(name in hops for name in expected), hops
            # (docs/webview.png is made the same way: scripts/webview_screenshot.py)
            shot = tmp_path / "webview.png"
            page.screenshot(path=str(shot))
            assert shot.read_bytes().startswith(b"\x89PNG")
            # A fifth volunteer joins, the page shows it; it leaves, the page drops it.
            leaver = api.add("leaver")
            wait_until("the page to show the new node", lambda: "leaver" in page.evaluate(shown), timeout=120)  # fmt: skip
            api.nodes = {a: p for a, p in api.nodes.items() if p is not leaver}
            leaver.kill(signal.SIGTERM)
            wait_until("the page to drop the node that left", lambda: "leaver" not in page.evaluate(shown), timeout=120)  # fmt: skip
        finally:
            browser.close()


def test_the_demo_starts_the_gateway_and_prints_its_url() -> None:
    done = nanoshard("demo", "--max-new-tokens", "5", "--api-port", "0", timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"web view: http://127\.0\.0\.1:\d+", done.stdout), done.stdout
    assert "all demo processes stopped" in done.stdout
