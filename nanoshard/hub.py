"""Models by Hugging Face hub id: ``--model gpt2`` (``gpt2-medium``, ``distilgpt2``,
``owner/name``, with ``--revision``), fetched through ``huggingface_hub``'s own client.

Only what a GPT-2 needs is downloaded: ``config.json``, the safetensors weights (single or
sharded) and the tokenizer files; ``pytorch_model.bin`` only for a repository that has no
safetensors. The library does the rest as everywhere else: its cache (``HF_HOME``,
``HF_HUB_CACHE``), ``HF_HUB_OFFLINE``, the token of ``hf auth login`` or ``HF_TOKEN``, its
progress bars. What comes back is a snapshot folder of its cache, a Hugging Face GPT-2
directory that :func:`nanoshard.checkpoint.open_checkpoint` reads like any other.

A ``--model`` that names an existing path is always that path; ``demo`` is the built-in
model; anything else shaped like a repo id is a hub id.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

from nanoshard.errors import CheckpointError

log = logging.getLogger(__name__)

CONFIG = ["config.json"]
TOKENIZER = [
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
PICKLE = ["pytorch_model.bin"]
# owner/name or a bare canonical name (gpt2): letters, digits, '-', '_', '.'
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


def looks_like_repo_id(spec: str) -> bool:
    """``spec`` can only be a hub id (it is checked against the disk first)."""
    return (
        bool(REPO_ID.match(spec)) and ".." not in spec and not spec.lower().endswith(FILE_SUFFIXES)
    )


def repo_of(path: Path) -> str | None:
    """The repo id of a snapshot folder of the hub's cache (``.../models--owner--name/
    snapshots/<commit>``), else None."""
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo.startswith("models--"):
        return None
    return repo.removeprefix("models--").replace("--", "/")


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def cache_folder() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def download(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (default: main), downloading what
    is missing from it. Every failure is one :class:`CheckpointError` saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=CONFIG + TOKENIZER + SAFETENSORS
            )
        )
        if not any(folder.glob("*.safetensors")) and not (folder / PICKLE[0]).exists():
            # an older repository, with torch's pickle only
            folder = Path(
                snapshot_download(
                    repo_id, revision=revision, allow_patterns=CONFIG + TOKENIZER + PICKLE
                )
            )
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{repo_id}: the Hugging Face hub has no revision {revision!r} of it"
        ) from None
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id}: a gated model: accept its terms on the hub, then log in "
            "(hf auth login) or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such file or directory, and no such model on the Hugging Face hub "
            "(a private one needs hf auth login or HF_TOKEN)"
        ) from None
    except IncompleteSnapshotError:
        raise CheckpointError(
            f"{repo_id}{at}: only part of it is in the Hugging Face cache ({cache_folder()}) and "
            "the hub cannot be reached: download it again online"
        ) from None
    except LocalEntryNotFoundError:
        if offline():
            raise CheckpointError(
                f"{repo_id}{at}: not in the Hugging Face cache ({cache_folder()}) and HF_HUB_OFFLINE "
                "is set: download it once online, or point HF_HUB_CACHE/HF_HOME at a cache holding it"
            ) from None
        raise CheckpointError(
            f"{repo_id}{at}: cannot reach the Hugging Face hub and it is not in the cache "
            f"({cache_folder()}): check the network, or give a local path"
        ) from None
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id}: not a file, nor a hub id ({e})") from None
    except HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{repo_id}{at}: the Hugging Face hub refused: {first}") from None
    except OSError as e:
        raise CheckpointError(f"{repo_id}{at}: cannot write the Hugging Face cache: {e}") from None
    log.info("%s%s: %s", repo_id, at, folder)
    return folder


def add_to_cache(
    directory: Path, repo_id: str, cache: Path, *, commit: str | None = None, ref: str = "main"
) -> Path:
    """Lay the files of a local model ``directory`` out in the hub cache ``cache`` as the
    snapshot of ``repo_id`` at ``ref``, exactly as ``huggingface_hub`` writes a download::

        <cache>/models--owner--name/blobs/<sha256 of a large file | git sha1 of a small one>
        <cache>/models--owner--name/snapshots/<commit>/<file> -> ../../blobs/<...>
        <cache>/models--owner--name/refs/<ref>                 the commit, no newline

    so that ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=<cache>`` serves it by id (a machine with no
    network, a test). ``commit`` defaults to a hash of the files. Returns the snapshot folder.
    """
    directory, cache = Path(directory), Path(cache)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    digest = hashlib.sha1()
    blobs = {}
    for path in files:
        data = path.read_bytes()
        if path.suffix in (".safetensors", ".bin"):  # LFS: named by sha256
            blobs[path.name] = hashlib.sha256(data).hexdigest()
        else:  # a git blob: named by its git object id
            blobs[path.name] = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        digest.update(f"{path.name} {blobs[path.name]}\n".encode())
    commit = commit or digest.hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for path in files:
        blob = repo / "blobs" / blobs[path.name]
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..") / ".." / "blobs" / blobs[path.name])
    (repo / "refs" / ref).write_text(commit)
    return snapshot
