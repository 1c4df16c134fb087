"""nin.data.download against a local http.server: checksums, atomic writes, safe extraction."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from nin.data import DataError, Resource, download, extract_archive
from nin.data.download import RESOURCES


@pytest.fixture()
def server(tmp_path):
    """Serve tmp_path/served on 127.0.0.1 from a thread; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> str:
    with tarfile.open(path, "w:gz") as bundle:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            bundle.addfile(info)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_official_table_complete():
    for name in ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"):
        assert RESOURCES[name] and all(len(resource.md5) == 32 for resource in RESOURCES[name])
    assert RESOURCES["cifar10"][0].md5 == "c32a1d4ab5d03f1284b67883e8d87530"


def test_download_verifies_and_extracts(server, tmp_path):
    folder, base = server
    md5 = _tar(folder / "fixture.tar.gz", {"fixture-batches/data.bin": b"x" * 3073})
    plain = b"plain file"
    (folder / "labels.gz").write_bytes(plain)
    resources = [
        Resource(f"{base}/fixture.tar.gz", md5, extract=True),
        Resource(f"{base}/labels.gz", hashlib.md5(plain).hexdigest(), "mnist"),
    ]
    root = download("fixture", tmp_path / "data", resources=resources, progress=False)
    assert (root / "fixture-batches" / "data.bin").read_bytes() == b"x" * 3073
    assert (root / "mnist" / "labels.gz").read_bytes() == plain
    (folder / "labels.gz").unlink()  # already present with the right checksum: no second request
    download("fixture", root, resources=resources[1:], progress=False)


def test_bad_checksum_leaves_nothing(server, tmp_path):
    folder, base = server
    (folder / "train_32x32.mat").write_bytes(b"not what was promised")
    target = tmp_path / "data"
    with pytest.raises(DataError, match="md5"):
        download("svhn", target, resources=[Resource(f"{base}/train_32x32.mat", "0" * 32, "svhn")], progress=False)
    assert not target.exists()  # no partial or temporary file, and not the folders made for it
    (target / "svhn").mkdir(parents=True)  # folders that were there stay
    with pytest.raises(DataError, match="md5"):
        download("svhn", target, resources=[Resource(f"{base}/train_32x32.mat", "0" * 32, "svhn")], progress=False)
    assert list((target / "svhn").iterdir()) == []


def test_unreachable_url_raises_after_retries(tmp_path):
    with pytest.raises(DataError, match="failed after 2 attempts"):
        download("x", tmp_path, resources=[Resource("http://127.0.0.1:9/nothing.bin", "0" * 32)], retries=2,
                 progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "members, links",
    [
        ({"../evil": b"x"}, None),
        ({"ok/../../evil": b"x"}, None),
        ({"/tmp/nin-evil-absolute": b"x"}, None),
        ({}, {"ok/link": "../../outside"}),
        ({}, {"ok/link": "/etc/passwd"}),
    ],
)
def test_unsafe_tar_rejected(server, tmp_path, members, links):
    folder, base = server
    md5 = _tar(folder / "evil.tar.gz", members, links)
    target = tmp_path / "data"
    with pytest.raises(DataError, match="evil.tar.gz"):
        download("evil", target, resources=[Resource(f"{base}/evil.tar.gz", md5, extract=True)], progress=False)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/nin-evil-absolute").exists()
    assert [p.name for p in target.iterdir()] == ["evil.tar.gz"]  # nothing extracted


def test_unsafe_zip_rejected(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("../evil", b"x")
    with pytest.raises(DataError, match="unsafe member"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()
