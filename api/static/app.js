// nanoshard's live web view: the swarm's status (an SSE feed of the gateway, which asks the
// coordinator) drawn as units, nodes along the model and spot-checks; and a prompt box that
// streams a completion through /v1/completions, each token marked with the nodes that
// computed it (the "nanoshard": {"hops": true} extension of the stream's chunks).
"use strict";

const $ = (id) => document.getElementById(id);
const PALETTE = ["#5aa9e6", "#e6a15a", "#7bd389", "#d77bd3", "#e6e15a", "#5ae6d7", "#e65a7b", "#a98be6"];
const colors = new Map(); // node name -> color, stable for the page's life
let units = []; // unit names, from the status

function colorOf(name) {
  if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
  return colors.get(name);
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function stageText(stage) {
  if (!stage) return "idle";
  const [s, e] = stage;
  const names = units.length ? `${units[s] ?? s}…${units[e - 1] ?? e - 1}` : "";
  return `[${s}, ${e}) ${names}`;
}

function fmt(x, digits = 1) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}

// ---- the swarm ----------------------------------------------------------------------

function drawSummary(st, gw) {
  const healthy = st.nodes.filter((n) => n.healthy).length;
  const covered = st.units.every((u) => u.replicas > 0);
  $("summary").textContent =
    `swarm ${st.swarm} · model ${st.model.name} · ${healthy}/${st.nodes.length} nodes healthy · ` +
    `${covered ? "every unit covered" : "units uncovered"} · ${fmt(st.measured_tokens_per_s)} tokens/s now · ` +
    `${gw.generations} generation(s) running through this gateway`;
}

function drawCoverage(st) {
  const box = $("coverage");
  box.replaceChildren(
    ...st.units.map((u) => {
      const cls = u.replicas === 0 ? "none" : u.replicas >= st.replicas_target ? "full" : "thin";
      return el("div", { class: `unit ${cls}`, "data-unit": u.name, title: `${u.replicas} replica(s)` },
        el("b", {}, u.replicas), u.name);
    }),
  );
}

// As nanoshard status's xN: the factor placement counts a slowed node by, else its live
// ratio over what the other nodes share once that is 1.5 or more.
function slowness(n) {
  if (n.slowdown > 1) return ` · slowed ×${fmt(n.slowdown)}`;
  return n.own_ratio >= 1.5 ? ` · ×${fmt(n.own_ratio)} slower than the others` : "";
}

function nodeCard(n, byAddress) {
  const stage = n.stage ? `${n.stage[0]}:${n.stage[1]}` : "idle";
  const loading = n.stage && (!n.serving || n.serving[0] !== n.stage[0] || n.serving[1] !== n.stage[1]);
  const cls = ["node"];
  if (!n.healthy && !n.heartbeating) cls.push("unhealthy");
  if (n.excluded) cls.push("excluded");
  if (loading) cls.push("loading");
  if (n.sessions > 0) cls.push("busy");
  // (nanoshard status's word; a serving node moving to another stage reads loading here)
  const health = n.health === "ok" && loading ? "loading" : n.health.toLowerCase();
  const step = n.live.decode_ms || n.step_ms_p50;
  const tp = n.tp.size > 1 ? `${n.tp.group} · rank ${n.tp.rank}/${n.tp.size}` : "–";
  const next = n.live.next_hops.map((h) => (byAddress.get(h.address) || h.address) + ` (${fmt(h.rtt_ms, 2)} ms)`);
  const rows = [
    ["device", `${n.device} ${n.dtype}`],
    ["TP group", tp],
    ["step", `${fmt(step, 2)} ms${slowness(n)}`],
    ["sessions", n.sessions],
    ["tokens/s", fmt(n.live.tokens_per_s)],
    ["next hops", next.length ? next.join(", ") : "–"],
    ["health", health],
  ];
  return el("div", { class: cls.join(" "), "data-node": n.name, "data-stage": stage, "data-health": health,
      style: `border-left-color: ${n.healthy && !n.excluded ? colorOf(n.name) : "var(--bad)"}` },
    el("div", { class: "name" }, n.name),
    el("span", { class: "stage" }, stageText(n.stage)),
    el("dl", {}, ...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
  );
}

function drawNodes(st) {
  const byAddress = new Map(st.nodes.map((n) => [n.address, n.name]));
  const columns = new Map(); // stage start -> nodes
  for (const n of st.nodes) {
    const key = n.stage ? n.stage[0] : Infinity;
    if (!columns.has(key)) columns.set(key, []);
    columns.get(key).push(n);
  }
  const parts = [];
  for (const key of [...columns.keys()].sort((a, b) => a - b)) {
    const nodes = columns.get(key).sort((a, b) => a.name.localeCompare(b.name));
    if (parts.length) {
      const flowing = nodes.some((n) => n.sessions > 0);
      parts.push(el("div", { class: flowing ? "arrow flowing" : "arrow" }, "→"));
    }
    parts.push(el("div", { class: "column" }, ...nodes.map((n) => nodeCard(n, byAddress))));
  }
  $("nodes").replaceChildren(...parts);
}

function drawChecks(st, gw) {
  $("checks").tBodies[0].replaceChildren(
    ...st.nodes.map((n) => {
      const state = n.excluded ? `excluded: ${n.excluded}` : "trusted";
      return el("tr", {}, el("td", {}, n.name), el("td", {}, n.checks.passed),
        el("td", { class: n.checks.failed ? "bad" : "" }, n.checks.failed),
        el("td", { class: n.excluded ? "bad" : "" }, state));
    }),
  );
  $("gwchecks").replaceChildren(
    ...(gw.checks.length ? gw.checks.slice(-8).reverse() : [null]).map((c) => c === null
      ? el("li", {}, "none yet (a small share of steps is re-run on a replica)")
      : el("li", {}, `${c.checked}, units [${c.units[0]}, ${c.units[1]}) at position ${c.pos}: ${c.agree ? "agree" : "DISAGREE"}`)),
  );
}

function onStatus(msg) {
  $("feed").classList.toggle("live", msg.ok);
  if (!msg.ok) {
    $("summary").textContent = `the swarm does not answer: ${msg.error}`;
    return;
  }
  const st = msg.status;
  units = st.units.map((u) => u.name);
  drawSummary(st, msg.gateway);
  drawCoverage(st);
  drawNodes(st);
  drawChecks(st, msg.gateway);
}

function follow() {
  const source = new EventSource("/nanoshard/status/events");
  source.onmessage = (e) => onStatus(JSON.parse(e.data));
  source.onerror = () => $("feed").classList.remove("live"); // EventSource reconnects itself
}

// ---- a completion, token by token ---------------------------------------------------

function hopsText(hops) {
  return hops.map((h) => `${h.node} [${h.units[0]}, ${h.units[1]}) ${fmt(h.compute_ms, 2)} ms`).join(" → ");
}

// Under each token, a bar with one color per hop that computed it, in route order.
function routeBar(hops) {
  const nodes = [...new Set(hops.map((h) => h.node))];
  if (!nodes.length) return "";
  const step = 100 / nodes.length;
  const stops = nodes.map((n, i) => `${colorOf(n)} ${i * step}% ${(i + 1) * step}%`).join(", ");
  return `background: linear-gradient(to right, ${stops}) bottom / 100% 3px no-repeat`;
}

async function ask(event) {
  event.preventDefault();
  const out = $("output");
  const prompt = $("prompt").value;
  out.replaceChildren(el("span", { class: "prompt" }, prompt));
  $("legend").replaceChildren();
  $("go").disabled = true;
  $("askstatus").textContent = "";
  const seen = new Set();
  let tokens = 0;
  const body = {
    model: document.body.dataset.model || undefined,
    prompt,
    max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    seed: Number($("seed").value),
    stream: true,
    stream_options: { include_usage: true },
    nanoshard: { hops: true },
  };
  try {
    const reply = await fetch("/v1/completions", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
    });
    if (!reply.ok) throw new Error((await reply.json()).error.message);
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) {
            $("askstatus").textContent += ` · ${chunk.usage.completion_tokens} tokens (prompt ${chunk.usage.prompt_tokens})`;
          }
          const choice = chunk.choices[0];
          if (!choice) continue;
          const hops = chunk.nanoshard ? chunk.nanoshard.hops : [];
          if (hops.length) tokens += 1;
          for (const h of hops) {
            if (!seen.has(h.node)) {
              seen.add(h.node);
              $("legend").append(el("span", { style: `--c: ${colorOf(h.node)}` }, h.node));
            }
          }
          if (choice.text) {
            const span = el("span", { class: "tok", "data-hops": hopsText(hops),
              style: routeBar(hops) }, choice.text);
            span.title = hopsText(hops);
            out.append(span);
          }
          if (choice.finish_reason) $("askstatus").textContent = `finished: ${choice.finish_reason}`;
        }
      }
    }
    $("askstatus").textContent += ` · ${tokens} steps traced`;
  } catch (err) {
    $("askstatus").textContent = `error: ${err.message}`;
  } finally {
    $("go").disabled = false;
  }
}

$("output").addEventListener("mouseover", (e) => {
  if (e.target.dataset && e.target.dataset.hops !== undefined) {
    $("tokeninfo").textContent = `${JSON.stringify(e.target.textContent)}: ${e.target.dataset.hops}`;
  }
});
$("ask").addEventListener("submit", ask);

fetch("/v1/models").then((r) => r.json()).then((m) => {
  if (m.data && m.data.length) document.body.dataset.model = m.data[0].id;
}).catch(() => {});
follow();
