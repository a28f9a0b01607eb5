"""Output file storage backends, configured by URL: local/shared directory and an S3-compatible bucket (moto's
S3 server on loopback, reached through boto3 like any S3 endpoint). In-process; the end-to-end path through
front-ends and workers is in tests/test_scale_out.py."""

from __future__ import annotations

import os
import time

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from benchmarks.loopback import free_port
from server.files.storage import FileStorage, LocalStorage, S3Storage, open_storage


@pytest.fixture(scope="module")
def s3_endpoint():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="out")
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


def test_default_and_shared_directory(tmp_path):
    default = open_storage(None, tmp_path / "data", 60)
    assert isinstance(default, LocalStorage) and default.local_dir == tmp_path / "data" / "files"
    shared = open_storage(f"file://{tmp_path}/shared", tmp_path / "data", 60)
    assert isinstance(shared, FileStorage) and shared.local_dir == tmp_path / "shared"
    shared.put("a.png", b"png", "image/png")
    assert shared.get("a.png") == (b"png", "image/png") and shared.get("missing.png") is None
    assert shared.url("a.png", "http://front:8000/") == "http://front:8000/files/a.png"
    old = tmp_path / "shared" / "old.png"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert shared.sweep(time.time() - 50) == 1 and not old.exists() and shared.get("a.png")


def test_bad_urls_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown storage URL"):
        open_storage("ftp://x/y", tmp_path, 60)
    with pytest.raises(ValueError, match="unknown storage option"):
        open_storage("s3://b/p?endpoint=http://x", tmp_path, 60)
    with pytest.raises(ValueError, match="urls="):
        open_storage("s3://b/p?urls=public", tmp_path, 60)


def test_s3_presigned_urls_proxy_and_sweep(s3_endpoint, tmp_path):
    storage = open_storage(f"s3://out/runs/a?endpoint_url={s3_endpoint}&region=us-east-1", tmp_path, 3600)
    assert isinstance(storage, S3Storage) and storage.local_dir is None
    storage.put("x.png", b"\x89PNG-bytes", "image/png")
    url = storage.url("x.png", "http://front:8000")
    assert url.startswith(f"{s3_endpoint}/out/runs/a/x.png?") and "X-Amz-Expires=3600" in url
    fetched = httpx.get(url)  # anyone with the URL, no credentials
    assert fetched.status_code == 200 and fetched.content == b"\x89PNG-bytes"
    assert "X-Amz-Signature=" in url  # (moto does not check signatures; real S3 and MinIO do)
    assert storage.get("x.png") == (b"\x89PNG-bytes", "image/png") and storage.get("nope.png") is None
    proxied = open_storage(f"s3://out/runs/a?endpoint_url={s3_endpoint}&urls=proxy", tmp_path, 3600)
    assert proxied.url("x.png", "http://front:8000/") == "http://front:8000/files/x.png"
    assert storage.sweep(time.time() - 60) == 0
    assert storage.sweep(time.time() + 60) == 1 and storage.get("x.png") is None


def test_presigned_urls_live_at_most_a_week(s3_endpoint, tmp_path):
    storage = open_storage(f"s3://out/p?endpoint_url={s3_endpoint}", tmp_path, 30 * 24 * 3600)
    assert "X-Amz-Expires=604800" in storage.url("f.png", "http://front")


def test_files_in_a_bucket_are_streamed_and_uploads_served_as_inert_bytes(s3_endpoint, fake_server, monkeypatch):
    from urllib.parse import urlsplit

    from tests.fake_editor import FakeEditor

    client, app = fake_server(FakeEditor(), storage=f"s3://out/inert?endpoint_url={s3_endpoint}&urls=proxy")
    storage = app.state.services.outputs.storage
    storage.put("page.bin", b"<script>alert(1)</script>", "text/html")  # as uploads were stored before
    storage.put("x.png", b"\x89PNG-bytes", "image/png")
    monkeypatch.setattr(S3Storage, "get", lambda *args: pytest.fail("a /files GET read the whole object"))
    page = client.get("/files/page.bin")
    assert page.status_code == 200 and page.content == b"<script>alert(1)</script>"
    assert page.headers["content-type"] == "application/octet-stream"
    assert page.headers["content-disposition"] == "attachment" and page.headers["x-content-type-options"] == "nosniff"
    image = client.get("/files/x.png")
    assert image.headers["content-type"] == "image/png" and "content-disposition" not in image.headers
    assert image.content == b"\x89PNG-bytes" and image.headers["content-length"] == "10"
    assert client.get("/files/missing.png").status_code == 404

    # an upload declared as HTML is kept in the bucket as bytes, not as a page the bucket would serve
    target = client.post("/storage/upload/initiate", json={"content_type": "text/html"}).json()
    assert client.put(urlsplit(target["upload_url"]).path, content=b"<html></html>").status_code == 200
    key = "inert/" + target["file_url"].rsplit("/", 1)[1]
    head = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").head_object(Bucket="out", Key=key)
    assert head["ContentType"] == "application/octet-stream"


def test_a_write_that_fails_leaves_no_truncated_file(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    storage = LocalStorage(tmp_path / "files")
    real_open = Path.open

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[: len(data) // 2])  # half of it fits
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: FullDisk(real_open(self, *args, **kwargs)))
    with pytest.raises(OSError, match="No space left"):
        storage.put("out.png", b"x" * 1000, "image/png")
    monkeypatch.undo()
    assert list((tmp_path / "files").iterdir()) == []  # neither a truncated out.png nor the partial
    storage.put("out.png", b"x" * 1000, "image/png")
    assert storage.get("out.png") == (b"x" * 1000, "image/png")
