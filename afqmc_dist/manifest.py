"""Content checksums of a folder the tool wrote and will read back (a checkpoint), in `sha256sum` format.

    OUTPUT_DIR/checkpoints/step_N/checksums.sha256     one `HASH  relative/path` line per file, sorted

Every file under the folder is listed, at any depth: sharded engines save the model and optimizer as folders
(FSDP's `pytorch_model_fsdp_0/`, `optimizer_0/`; DeepSpeed's `pytorch_model/`). A folder is intact only if the
listed files are exactly the files present and each one's content matches. The format is self-checking against
any single changed byte: a changed hash or path no longer matches a file, and a changed separator or newline no
longer parses. `sha256sum -c checksums.sha256`, run inside the folder, checks it by hand.
"""

from __future__ import annotations

import hashlib
import os
import re

CHECKSUMS = "checksums.sha256"
_LINE = re.compile(r"([0-9a-f]{64})  ([^\n]+)")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: str) -> list[str]:
    """Every file under `folder`, as sorted '/'-separated relative paths (the manifest itself excluded)."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
            if rel != CHECKSUMS:
                files.append(rel)
    return sorted(files)


def write_manifest(folder: str) -> None:
    """Hash every file under `folder` and write FOLDER/checksums.sha256 (last: its presence means complete)."""
    lines = [f"{file_sha256(os.path.join(folder, rel))}  {rel}\n" for rel in folder_files(folder)]
    path = os.path.join(folder, CHECKSUMS)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def manifest_problem(folder: str) -> str | None:
    """Why `folder` does not match its manifest (missing, extra, changed or cut-short file), or None."""
    path = os.path.join(folder, CHECKSUMS)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return f"no {CHECKSUMS} (the save did not finish)"
    except (OSError, UnicodeDecodeError) as e:
        return f"{CHECKSUMS} cannot be read ({e})"
    listed: dict[str, str] = {}
    for number, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        match = _LINE.fullmatch(line)
        rel = match.group(2) if match else ""
        if not match or rel.startswith("/") or ".." in rel.split("/") or rel in listed:
            return f"{CHECKSUMS}:{number} is damaged"
        listed[rel] = match.group(1)
    if not listed:
        return f"{CHECKSUMS} lists no file"
    present = folder_files(folder)
    missing = sorted(set(listed) - set(present))
    if missing:
        return f"{missing[0]} is missing"
    extra = sorted(set(present) - set(listed))
    if extra:
        return f"{extra[0]} is not in {CHECKSUMS} (added after the save)"
    for rel, expected in listed.items():
        file = os.path.join(folder, rel)
        if file_sha256(file) != expected:
            return f"{rel} ({os.path.getsize(file)} bytes) does not match its checksum (damaged or cut short)"
    return None
