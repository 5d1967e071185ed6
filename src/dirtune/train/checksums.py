"""Checksums of a published folder (a checkpoint or final/): `checksums.json`, written after the
files are complete and before the folder is renamed into place, verified before resuming.

Structural checks (checkpoints.checkpoint_problem) catch truncation; they cannot see bytes changed
in place (a bad disk block, a copy gone wrong). The digest can.

Cost: every byte is read once more after writing (from the page cache, just written) and once
before resuming. To keep that small on multi-GB checkpoints, each file is hashed in blocks of
BLOCK bytes spread over a thread pool (hashlib releases the GIL on large buffers), and a file's
digest is the sha256 of its blocks' sha256 digests: "sha256 of 16 MiB blocks", not the plain
`sha256sum` of the file. On 2 loaded CPU cores this read about 0.4 GB/s per thread.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

NAME = "checksums.json"
BLOCK = 16 << 20
ALGORITHM = "sha256-of-16MiB-block-sha256"


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _block_digest(path: Path, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(BLOCK)).digest()


def file_digests(paths: list[Path]) -> dict[Path, tuple[int, str]]:
    """(size, digest) of each file, its blocks hashed in parallel."""
    sizes = {p: p.stat().st_size for p in paths}
    jobs = [(p, off) for p in paths for off in range(0, max(sizes[p], 1), BLOCK)]
    with ThreadPoolExecutor(_threads()) as pool:
        blocks = list(pool.map(lambda job: _block_digest(*job), jobs))
    found: dict[Path, list[bytes]] = {p: [] for p in paths}
    for (p, _), d in zip(jobs, blocks):
        found[p].append(d)
    return {p: (sizes[p], hashlib.sha256(b"".join(found[p])).hexdigest()) for p in paths}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != NAME)


def write(folder: str | Path) -> None:
    """Write `folder/checksums.json` covering every file under `folder`."""
    folder = Path(folder)
    digests = file_digests(_files(folder))
    record = {"algorithm": ALGORITHM, "block_bytes": BLOCK,
              "files": {str(p.relative_to(folder)): {"size": s, "digest": d} for p, (s, d) in digests.items()}}
    (folder / NAME).write_text(json.dumps(record, indent=1))


def problem(folder: str | Path) -> str | None:
    """None if every file `checksums.json` lists is there with its size and digest (or if the
    folder has no checksums.json: written before checksums existed); else what differs."""
    folder = Path(folder)
    manifest = folder / NAME
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
        files = {name: (int(v["size"]), str(v["digest"])) for name, v in record["files"].items()}
        if record.get("algorithm") != ALGORITHM:
            return f"{NAME} uses an unknown algorithm {record.get('algorithm')!r}"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return f"{NAME} is unreadable ({type(e).__name__}: {e})"
    present = []
    for name, (size, _) in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing (listed in {NAME})"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {NAME} says {size}"
        present.append(path)
    for path, (_, digest) in file_digests(present).items():
        if digest != files[str(path.relative_to(folder))][1]:
            return f"{path.relative_to(folder)} does not match its checksum (its bytes changed after it was written)"
    return None
