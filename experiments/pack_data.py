"""Split a folder (a data root, or a run folder) into parts small enough to ship, and join them again.

    python experiments/pack_data.py pack ../shared/data parts/ --part-mib 60   # part-000.tar ... + manifest.json
    python experiments/pack_data.py unpack parts/ /tmp/nin-data                 # checks each sha256, then extracts

The folder goes into one uncompressed tar stream, cut into parts of at most ``--part-mib`` MiB (default 60,
under a 64 MiB transfer limit; use 15 for a 16 MiB-per-file limit). ``manifest.json`` lists each part with its
size and sha256; `unpack` refuses a missing or damaged part before it writes anything. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from pathlib import Path

BLOCK = 1 << 20


class _SplitWriter:
    """A write-only stream that rolls over to a new part file every ``part_bytes`` bytes."""

    def __init__(self, folder: Path, part_bytes: int) -> None:
        self.folder, self.part_bytes = folder, part_bytes
        self.parts: list[dict] = []
        self._file = None
        self._digest = None
        self._written = 0

    def _open_next(self) -> None:
        self._close_part()
        name = f"part-{len(self.parts):03d}.tar"
        self.parts.append({"name": name, "bytes": 0, "sha256": ""})
        self._file = open(self.folder / name, "wb")
        self._digest = hashlib.sha256()
        self._written = 0

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1].update(bytes=self._written, sha256=self._digest.hexdigest())
            self._file = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or self._written == self.part_bytes:
                self._open_next()
            take = min(len(view), self.part_bytes - self._written)
            self._file.write(view[:take])
            self._digest.update(view[:take])
            self._written += take
            view = view[take:]
        return len(data)

    def close(self) -> None:
        self._close_part()


class _JoinReader:
    """A read-only stream over the parts, in order."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self._file = None

    def read(self, size: int = -1) -> bytes:
        chunks = []
        while size != 0:
            if self._file is None:
                if not self.paths:
                    break
                self._file = open(self.paths.pop(0), "rb")
            data = self._file.read(size if size > 0 else BLOCK)
            if not data:
                self._file.close()
                self._file = None
                continue
            chunks.append(data)
            if size > 0:
                size -= len(data)
        return b"".join(chunks)


def pack(source: Path, parts_dir: Path, part_mib: float) -> dict:
    """Write ``source``'s files as tar parts of at most ``part_mib`` MiB plus manifest.json into ``parts_dir``."""
    if not source.is_dir():
        raise SystemExit(f"pack: {source} is not a folder")
    parts_dir.mkdir(parents=True, exist_ok=True)
    if any(parts_dir.glob("part-*.tar")):
        raise SystemExit(f"pack: {parts_dir} already holds parts; choose an empty folder")
    writer = _SplitWriter(parts_dir, int(part_mib * 2**20))
    files = sorted(p for p in source.rglob("*") if p.is_file())
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            tar.add(path, arcname=path.relative_to(source).as_posix(), recursive=False)
    writer.close()
    manifest = {"source": source.name, "files": len(files), "part_bytes": writer.part_bytes, "parts": writer.parts}
    (parts_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def unpack(parts_dir: Path, dest: Path) -> dict:
    """Check every part against manifest.json, then extract the folder into ``dest``."""
    manifest = json.loads((parts_dir / "manifest.json").read_text())
    paths = []
    for part in manifest["parts"]:
        path = parts_dir / part["name"]
        if not path.is_file():
            raise SystemExit(f"unpack: {path} is missing ({len(manifest['parts'])} parts expected)")
        if path.stat().st_size != part["bytes"] or _sha256(path) != part["sha256"]:
            raise SystemExit(f"unpack: {path} is damaged (size or sha256 differs from manifest.json)")
        paths.append(path)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=_JoinReader(paths), mode="r|") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")  # no absolute paths, no links out of dest
        else:
            tar.extractall(dest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="folder -> parts + manifest.json", allow_abbrev=False)
    p.add_argument("source", type=Path)
    p.add_argument("parts_dir", type=Path)
    p.add_argument("--part-mib", type=float, default=60, help="largest part in MiB (default 60)")
    p = sub.add_parser("unpack", help="parts + manifest.json -> folder", allow_abbrev=False)
    p.add_argument("parts_dir", type=Path)
    p.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        manifest = pack(args.source, args.parts_dir, args.part_mib)
        print(f"pack: {manifest['files']} files of {args.source} -> {len(manifest['parts'])} parts in {args.parts_dir}")
    else:
        manifest = unpack(args.parts_dir, args.dest)
        print(f"unpack: {manifest['files']} files -> {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
