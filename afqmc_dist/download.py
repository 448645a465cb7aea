"""Download the public AFQMC split (CLUE's afqmc_public.zip), verify it and unpack train/dev/test.json.

    python -m afqmc_dist.download                                  # -> data/afqmc_public/{train,dev,test}.json
    python -m afqmc_dist.download --output_dir /data/afqmc --force
    python -m afqmc_dist.download --url file:///mnt/mirror/afqmc_public.zip

The zip may hold the three files at its top level or inside one folder. Every file's sha256 must match the
official one before anything is moved into the output folder: the download and the unpacked files live in a
temporary folder beside the output folder and are removed on any failure, so the output folder is either left
as it was or holds three verified files. If it already holds them, nothing is downloaded (unless --force).
Errors are one `error: ...` line on stderr, exit status 2; an unexpected error is one line too, exit status 4,
with its traceback in error.log in the output folder's parent.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .errors import CommandParser, UserError, log_errors_to
from .files import make_missing_dirs, remove_empty_dirs
from .preemption import run_command

DEFAULT_URL = "https://storage.googleapis.com/cluebenchmark/tasks/afqmc_public.zip"
DEFAULT_OUTPUT_DIR = "data/afqmc_public"
TIMEOUT_SECONDS = 30  # per connection attempt and per read: a stalled server fails instead of hanging
CHUNK_BYTES = 1 << 16

# sha256 of the official files of CLUE's afqmc_public.zip (train 34334 lines, dev 4316, test 3861).
EXPECTED_SHA256 = {
    "train.json": "41c0ed462fe3da60c575c4f81f4799ba8fbe51155f962adcfc19c26b2de3f012",
    "dev.json": "20b35a40e1aec2141e50247f798b2eef0e974accb9ca7196105ecb547c65c7b8",
    "test.json": "9d2a78d43215a0d4d34230f4aaca1d2cdbad03e1f268bef9da0468e0dc9eb4e5",
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def already_present(output_dir: Path) -> bool:
    """True if `output_dir` holds all three files with the official checksums."""
    return all((output_dir / name).is_file() and sha256_of(output_dir / name) == expected
               for name, expected in EXPECTED_SHA256.items())


def fetch(url: str, dest: Path) -> None:
    """Stream `url` (http, https or file) into `dest`, with a progress bar on a terminal."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = _copy_with_progress(response, dest, total)
    except urllib.error.HTTPError as e:
        e.close()
        raise UserError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise UserError(f"cannot download {url}: {e.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise UserError(f"cannot download {url}: {e or type(e).__name__}") from None
    if total is not None and received != total:
        raise UserError(f"cannot download {url}: connection closed after {received} of {total} bytes")


def _copy_with_progress(response, dest: Path, total: int | None) -> int:
    received = 0
    # disable=None: no bar when stderr is not a terminal (logs, CI), so errors stay one line there.
    with open(dest, "wb") as out, tqdm(total=total, desc="afqmc_public.zip", unit="B", unit_scale=True,
                                       unit_divisor=1024, disable=None) as bar:
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
            out.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received


def find_member(archive: zipfile.ZipFile, name: str, url: str) -> str:
    """The archive entry for `name`: at the top level or inside one folder, exactly once."""
    found = [info.filename for info in archive.infolist()
             if not info.is_dir() and PurePosixPath(info.filename).name == name
             and len(PurePosixPath(info.filename).parts) <= 2 and not info.filename.startswith("__MACOSX/")]
    if not found:
        raise UserError(f"{name} not found in {url} (looked at the top level and one folder down)")
    if len(found) > 1:
        raise UserError(f"{name} is in {url} more than once ({', '.join(found)})")
    return found[0]


def extract(zip_path: Path, staging: Path, url: str) -> None:
    """Copy the three files out of the zip into `staging` (only these names, so no path in the zip is trusted)."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise UserError(f"{url} is not a zip file ({zip_path.stat().st_size} bytes downloaded)") from None
    with archive:
        staging.mkdir()
        for name in EXPECTED_SHA256:
            member = find_member(archive, name, url)
            try:
                with archive.open(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK_BYTES)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
                # RuntimeError: an encrypted member ("password required for extraction")
                raise UserError(f"{member} in {url} cannot be unpacked: {e}") from None


def verify(staging: Path, url: str) -> None:
    for name, expected in EXPECTED_SHA256.items():
        actual = sha256_of(staging / name)
        if actual != expected:
            raise UserError(f"{name} in {url}: sha256 {expected} expected, got {actual}")


def install(staging: Path, output_dir: Path) -> None:
    """Move the verified files into place: one rename of the folder, or file by file into an existing one."""
    try:
        if not output_dir.exists():
            os.replace(staging, output_dir)
            return
        for name in EXPECTED_SHA256:
            os.replace(staging / name, output_dir / name)
    except OSError as e:
        raise UserError(f"cannot move the files into {output_dir}: {e}") from None


def download(url: str, output_dir: Path, force: bool = False) -> str:
    """Fetch, verify and install the three files; return what was done, as one line for the user."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output_dir {output_dir} exists and is not a folder")
    names = ", ".join(EXPECTED_SHA256)
    if not force and already_present(output_dir):
        return f"{output_dir} already holds {names} with the official checksums; nothing to do (--force to redo)"
    try:
        created = make_missing_dirs(output_dir.parent)
    except OSError as e:
        raise UserError(f"cannot create {output_dir.parent}: {e}") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.download-", dir=output_dir.parent))
    except OSError as e:
        remove_empty_dirs(created)
        raise UserError(f"cannot create a temporary folder in {output_dir.parent}: {e}") from None
    try:
        fetch(url, tmp / "afqmc_public.zip")
        extract(tmp / "afqmc_public.zip", tmp / "files", url)
        verify(tmp / "files", url)
        install(tmp / "files", output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not output_dir.exists():
            remove_empty_dirs(created)
    return f"saved {names} to {output_dir} (sha256 verified)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = CommandParser(prog="python -m afqmc_dist.download",
                     description="Download and verify the public AFQMC split (train/dev/test.json).")
    parser.add_argument("--url", default=DEFAULT_URL, help="where afqmc_public.zip is (http, https or file://)")
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="folder for the three files")
    parser.add_argument("--force", action="store_true", help="download even if the files are already there")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    log_errors_to(os.path.dirname(os.path.abspath(output_dir)))
    print(download(args.url, output_dir, args.force))


def main(argv: list[str] | None = None) -> int:
    """Run the download; return the exit status (0 done or already present, 2 for an error, printed as one line;
    see errors.exit_status)."""
    return run_command(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
