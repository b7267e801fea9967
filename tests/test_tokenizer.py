"""The tokenizer module: HF-style BPE files -> tiktoken, GPT-2's own files, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiktoken

from nanoshard import tokenizer
from nanoshard.errors import CheckpointError, InvalidArgument, NotFound
from nanoshard.tokenizer import (
    ENDOFTEXT,
    GPT2_FILES,
    gpt2_encoding,
    load_encoding,
    tiktoken_cache_key,
)

VARIED_TEXT = (
    "Hello world! It's 2024, and we'll see    what they've done.\n\n"
    "  Indented line\twith a tab; numbers 3.14159 and 1,000,000.\r\n"
    "Unicode: café, naïve, Zürich, Ελληνικά, русский, 中文字符, emoji 🤖🎉 — dashes…\n"
    "Code: def f(x): return x**2  # comment\n"
    "   trailing spaces   \n\n\n"
    "ALL CAPS, MiXeD cAsE, don't DON'T I'M you're\n"
    "URL https://example.com/a?b=c&d=e and e-mail someone@example.org\n"
)
GPT2_DIR_AVAILABLE = all((tokenizer.gpt2_bpe_dir() / name).is_file() for name in GPT2_FILES)
needs_gpt2 = pytest.mark.skipif(
    not GPT2_DIR_AVAILABLE,
    reason=f"GPT-2 BPE files absent from {tokenizer.gpt2_bpe_dir()}: run `make gpt2-bpe`",
)


def _byte_encoder() -> dict[int, str]:
    return {b: ch for ch, b in tokenizer._byte_decoder().items()}


def _write_tiny_bpe(directory: Path, merges: list[tuple[bytes, bytes]]) -> Path:
    """A hand-made HF-style byte-level BPE: 256 bytes, then one token per merge, then eot."""
    enc = _byte_encoder()
    as_text = lambda b: "".join(enc[x] for x in b)  # noqa: E731
    vocab = {as_text(bytes([b])): b for b in range(256)}
    for left, right in merges:
        vocab[as_text(left + right)] = len(vocab)
    vocab[ENDOFTEXT] = len(vocab)
    lines = ["#version: 0.2", *(f"{as_text(a)} {as_text(b)}" for a, b in merges)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


TINY_MERGES = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"i", b"n"), (b" ", b"in")]


def test_byte_decoder_is_a_bijection_onto_bytes() -> None:
    decoder = tokenizer._byte_decoder()
    assert len(decoder) == 256
    assert sorted(decoder.values()) == list(range(256))
    assert decoder["Ġ"] == ord(" ") and decoder["Ċ"] == ord("\n") and decoder["A"] == ord("A")


def test_tiny_bpe_merges_and_round_trips(tmp_path: Path) -> None:
    enc = load_encoding(_write_tiny_bpe(tmp_path / "tiny", TINY_MERGES))
    assert enc.n_vocab == 256 + len(TINY_MERGES) + 1
    assert enc.eot_token == 256 + len(TINY_MERGES)
    # " the" becomes one token (id 258), " in" one token (260); "x" stays a byte.
    assert enc.encode_ordinary(" the in x") == [258, 260, ord(" "), ord("x")]
    text = "then the inn, in the end <|endoftext|> ünïcødé 🤖\n"
    assert enc.decode(enc.encode(text, allowed_special="all")) == text
    assert enc.encode(ENDOFTEXT, allowed_special="all") == [enc.eot_token]
    with pytest.raises(ValueError):  # special tokens in user text are refused by default
        enc.encode(ENDOFTEXT)


def test_merges_out_of_id_order_are_refused(tmp_path: Path) -> None:
    directory = _write_tiny_bpe(tmp_path / "bad", TINY_MERGES)
    lines = (directory / "merges.txt").read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # a merge now makes a smaller id than the one before
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidArgument, match="merge order"):
        load_encoding(directory)


def test_merge_missing_from_vocab_is_refused(tmp_path: Path) -> None:
    directory = _write_tiny_bpe(tmp_path / "bad", TINY_MERGES)
    with (directory / "merges.txt").open("a") as f:
        f.write("x y\n")
    with pytest.raises(InvalidArgument, match="not in"):
        load_encoding(directory)


def test_missing_files_are_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_encoding(tmp_path)


def test_gpt2_encoding_without_files_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(tokenizer.GPT2_BPE_ENV, str(tmp_path))
    with pytest.raises(NotFound, match="make gpt2-bpe"):
        gpt2_encoding()


@needs_gpt2
def test_gpt2_encoding_matches_tiktoken_gpt2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ours, built from the HF-style files, against tiktoken's own gpt2 reading the same files
    from its cache (named by sha1 of the URL, as tiktoken names its downloads)."""
    source = tokenizer.gpt2_bpe_dir()
    for filename, (url, _) in GPT2_FILES.items():
        (tmp_path / tiktoken_cache_key(url)).write_bytes((source / filename).read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("gpt2")

    ours = gpt2_encoding()
    assert ours.n_vocab == reference.n_vocab == 50257
    assert ours.eot_token == reference.eot_token == 50256
    text = VARIED_TEXT * 3 + ENDOFTEXT + " after the end"
    ids = ours.encode(text, allowed_special="all")
    assert ids == reference.encode(text, allowed_special="all")
    assert ours.decode(ids) == text
    assert ours.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's well-known ids


@needs_gpt2
def test_hf_files_equal_gpt2_on_openai_files_under_hf_names(tmp_path: Path) -> None:
    """encoder.json / vocab.bpe are GPT-2's vocab.json / merges.txt: load them as a model dir."""
    source = tokenizer.gpt2_bpe_dir()
    (tmp_path / "vocab.json").write_bytes((source / "encoder.json").read_bytes())
    (tmp_path / "merges.txt").write_bytes((source / "vocab.bpe").read_bytes())
    enc = load_encoding(tmp_path)
    ref = gpt2_encoding()
    assert enc.encode(VARIED_TEXT) == ref.encode(VARIED_TEXT)
    assert enc.decode(enc.encode(VARIED_TEXT)) == VARIED_TEXT


def test_endoftext_sharing_an_id_is_refused(tmp_path: Path) -> None:
    directory = _write_tiny_bpe(tmp_path / "bad", TINY_MERGES)
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab[ENDOFTEXT] = 258  # the id of " the"
    (directory / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(InvalidArgument, match="shares its id"):
        load_encoding(directory)


def test_a_models_own_tokenizer_is_beside_its_weights(tmp_path: Path) -> None:
    """A Hugging Face folder's files, or those in the folder of a checkpoint file: the same
    rule for the coordinator, ``generate --local`` and a client on a fixed route. One of
    the two files without the other is refused, not passed over for GPT-2's."""
    folder = _write_tiny_bpe(tmp_path / "model", TINY_MERGES)
    checkpoint = folder / "ckpt.pt"
    checkpoint.write_bytes(b"")
    for path in (folder, checkpoint):
        assert tokenizer.tokenizer_files(path) == (folder / "vocab.json", folder / "merges.txt")
        assert tokenizer.encoding_for(path).n_vocab == 256 + len(TINY_MERGES) + 1
    assert tokenizer.tokenizer_files(tmp_path / "elsewhere.pt") is None
    (folder / "vocab.json").unlink()
    for path in (folder, checkpoint):
        with pytest.raises(CheckpointError, match=r"has merges\.txt but not the rest"):
            tokenizer.encoding_for(path)


def test_a_prompt_outside_the_models_vocabulary_names_the_tokenizer(tmp_path: Path) -> None:
    enc = load_encoding(_write_tiny_bpe(tmp_path / "tiny", TINY_MERGES))
    assert tokenizer.prompt_ids(enc, " the", 300) == [258]
    assert tokenizer.prompt_ids(enc, "", 300) == [enc.eot_token]  # an unconditioned text
    with pytest.raises(InvalidArgument, match=r"token id 258 in the tokenizer \(tiny, 262 ids\)"):
        tokenizer.prompt_ids(enc, " the", 258)
    assert tokenizer.vocabulary_mismatch(50257, 50304, "GPT-2's") == ""  # (padded)
    assert "its vocabulary has 96 entries" in tokenizer.vocabulary_mismatch(50257, 96, "GPT-2's")
