"""The shipped demo model: a sane Hugging Face GPT-2 directory whose text reads as English."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nanoshard.checkpoint import open_checkpoint
from nanoshard.config import GPTConfig
from nanoshard.engine import Stage, init_weights
from nanoshard.tokenizer import load_encoding

DEMO_DIR = Path(__file__).resolve().parent.parent / "nanoshard" / "demo_model"
PROMPT = "KING.\nWhat news, my lord?\n\nMESSENGER.\nMy lord,"
# The most frequent words of English (and of Shakespeare's plays): in real text they make up
# well over a fifth of the words, in token soup almost none.
COMMON_WORDS = set(
    [
        "the",
        "and",
        "i",
        "to",
        "of",
        "a",
        "my",
        "you",
        "that",
        "in",
        "is",
        "not",
        "with",
        "me",
        "it",
        "for",
        "be",
        "his",
        "your",
        "this",
        "but",
        "he",
        "have",
        "as",
        "thou",
        "so",
        "him",
        "will",
        "what",
        "thy",
        "all",
        "her",
        "no",
        "by",
        "do",
        "shall",
        "if",
        "are",
        "we",
        "thee",
        "our",
        "on",
        "lord",
        "now",
    ]
)


@pytest.fixture(scope="module")
def encoding():
    return load_encoding(DEMO_DIR)


@pytest.fixture(scope="module")
def model() -> Stage:
    ckpt = open_checkpoint(DEMO_DIR)
    return ckpt.load_stage(0, ckpt.config.n_units)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Decoding a tiny model is many small ops: on a busy 2-core machine one thread is faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(model: Stage, ids: list[int], n: int, temperature: float, seed: int = 0) -> list[int]:
    """Greedy (temperature 0) or top-k 40 sampling, with the engine's KV cache."""
    gen = torch.Generator().manual_seed(seed)
    cache = model.new_cache(len(ids) + n)
    out = list(ids)
    with torch.inference_mode():
        logits = model(torch.tensor(ids), cache=cache, pos=0)[-1]
        for _ in range(n):
            if temperature == 0:
                out.append(int(logits.argmax()))
            else:
                top = torch.topk(logits / temperature, 40)
                pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                out.append(int(top.indices[pick]))
            logits = model(torch.tensor(out[-1:]), cache=cache, pos=len(out) - 1)[-1]
    return out[len(ids) :]


def vocabulary_words(encoding) -> set[str]:
    """The whole words the BPE learned as single tokens (' word'): the corpus's common words."""
    words = set()
    for token in range(encoding.n_vocab - 1):
        piece = encoding.decode_single_token_bytes(token)
        if re.fullmatch(rb" [A-Za-z]+", piece):
            words.add(piece[1:].decode().lower())
    return words


def english_check(text: str, known: set[str]) -> tuple[float, float, int]:
    """(share of words that are known words, share that are common words, distinct words)."""
    words = [w.lower() for w in re.findall(r"[A-Za-z]+(?:'[a-z]+)?", text)]
    words = [w.split("'")[0] for w in words]
    if not words:
        return 0.0, 0.0, 0
    known_share = sum(w in known for w in words) / len(words)
    common_share = sum(w in COMMON_WORDS for w in words) / len(words)
    return known_share, common_share, len(set(words))


def looks_english(text: str, known: set[str]) -> bool:
    known_share, common_share, distinct = english_check(text, known)
    return known_share >= 0.6 and common_share >= 0.2 and distinct >= 8


def test_directory_is_a_small_sane_gpt2() -> None:
    names = {p.name for p in DEMO_DIR.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "MODEL_CARD.md",
    } <= names
    size = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert size <= 25 * 2**20, f"demo model is {size / 2**20:.1f} MiB"
    hf = json.loads((DEMO_DIR / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
    assert hf["activation_function"] == "gelu_new"
    assert hf["n_layer"] >= 6 and hf["n_embd"] % hf["n_head"] == 0
    assert hf["n_positions"] == hf["n_ctx"] >= 128


def test_checkpoint_config_matches_tokenizer(encoding) -> None:
    config: GPTConfig = open_checkpoint(DEMO_DIR).config
    hf = json.loads((DEMO_DIR / "config.json").read_text())
    assert config.vocab_size == encoding.n_vocab == hf["vocab_size"]
    assert hf["eos_token_id"] == hf["bos_token_id"] == encoding.eot_token == config.vocab_size - 1
    assert config.n_layer == hf["n_layer"] and config.block_size == hf["n_positions"]


def test_tokenizer_round_trip(encoding) -> None:
    text = "To be, or not to be: that is the question.\nHAMLET. O, what a rogue! 1623 ünï 🎭\n"
    ids = encoding.encode(text)
    assert encoding.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # a trained BPE, not bytes
    # Shakespeare's common words are single tokens of this vocabulary.
    assert {"thou", "lord", "king", "love"} <= vocabulary_words(encoding)


def test_greedy_and_sampled_text_read_as_english(model: Stage, encoding) -> None:
    known = vocabulary_words(encoding)
    prompt = encoding.encode(PROMPT)
    greedy = encoding.decode(generate(model, prompt, 60, temperature=0))
    sampled = encoding.decode(generate(model, prompt, 60, temperature=0.8, seed=1))
    for text in (greedy, sampled):
        assert looks_english(text, known), (text, english_check(text, known))


def test_the_english_check_rejects_an_untrained_model(encoding) -> None:
    """The check above can fail: the same architecture with random weights does not pass it."""
    config = open_checkpoint(DEMO_DIR).config
    untrained = Stage.from_tensors(config, 0, config.n_units, init_weights(config, seed=0))
    known = vocabulary_words(encoding)
    text = encoding.decode(generate(untrained, encoding.encode(PROMPT), 60, temperature=1.0))
    assert not looks_english(text, known), text


def test_transformers_reads_the_directory_with_the_same_logits(model: Stage, encoding) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(DEMO_DIR).eval()
    ids = encoding.encode("ROMEO. But soft, what light through yonder window breaks?")
    with torch.inference_mode():
        ours = model(torch.tensor(ids), all_logits=True)
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_hugging_face_tokenizer_gives_the_same_ids(encoding) -> None:
    """A Hugging Face user reading this directory tokenizes exactly as nanoshard does."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(DEMO_DIR)
    text = (
        "KING LEAR.\nHow now, daughter! what makes that frontlet on?\n\n"
        "   Methinks you are too much of late i' the frown.  1606, naïve 🎭\n\n\n"
    )
    assert hf(text)["input_ids"] == encoding.encode(text)
    assert hf.convert_tokens_to_ids("<|endoftext|>") == encoding.eot_token
