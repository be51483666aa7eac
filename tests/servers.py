"""Real servers on loopback for the sharing tests: an S3 server (moto) and a plain web server.

Both run in threads of the test process and listen on 127.0.0.1 only, on free ports.
Import the fixtures into a test module (`from servers import s3, http_root`) to use them.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Plain test credentials: moto accepts any until IAM checks are switched on (see `read_only_user`).
TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (they time out slowly)
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clear_s3fs_cache() -> None:
    """fsspec reuses filesystem instances per option set; credentials from env are not part of that key."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class S3Server:
    endpoint: str
    options: dict[str, Any] = field(default_factory=dict)  # s3fs storage options (no credentials)

    def cli_options(self) -> list[str]:
        return [f"--storage-option=endpoint_url={self.endpoint}"]

    def boto(self, service: str = "s3"):
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self, name: str) -> str:
        self.boto().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str) -> dict[str, tuple[str, str]]:
        """key -> (ETag, LastModified) of every object: a snapshot to prove nothing was written."""
        out: dict[str, tuple[str, str]] = {}
        for page in self.boto().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                out[obj["Key"]] = (obj["ETag"], obj["LastModified"].isoformat())
        return out

    def set_auth(self, enabled: bool) -> None:
        """Switch moto's IAM checks on (every request needs a known key and a permitting policy) or off."""
        import requests

        requests.post(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if enabled else b"inf", timeout=10)


@contextlib.contextmanager
def moto_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request lines on the test output
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield S3Server(endpoint=endpoint, options={"endpoint_url": endpoint})
    finally:
        server.stop()


@contextlib.contextmanager
def moto_subprocess(timeout: float = 30.0) -> Iterator[S3Server]:
    """The same server in its own process: for benchmarks, so serving requests does not compete with the
    measured code for this process's interpreter lock (a real object store runs elsewhere too)."""
    import subprocess
    import sys
    import time

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.1)
        yield S3Server(endpoint=endpoint, options={"endpoint_url": endpoint})
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def read_only_user(server: S3Server, bucket: str) -> Iterator[tuple[str, str]]:
    """An IAM user allowed to list and get, explicitly denied every write; IAM checks on while inside.

    Yields (access key id, secret). Meant to be put in the environment, as a teammate would.
    """
    iam = server.boto("iam")
    name = f"reader-{free_port()}"
    iam.create_user(UserName=name)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"], "Resource": "*"},
            {"Effect": "Deny", "Action": ["s3:PutObject", "s3:DeleteObject", "s3:CreateBucket", "s3:PutObjectAcl"],
             "Resource": "*"},
        ],
    }
    iam.put_user_policy(UserName=name, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    server.set_auth(True)
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.set_auth(False)


class _NoListingHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server like nginx or an object-store website: byte ranges, no directory listing,
    no writes. (Python's own handler ignores Range headers, which zarr needs to read shard indexes.)"""

    def list_directory(self, path):  # noqa: ANN001 - http.server signature
        self.send_error(404, "directory listing disabled")
        return None

    def send_head(self):  # noqa: ANN201 - http.server signature
        spec = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not spec or not spec.startswith("bytes=") or "," in spec or not os.path.isfile(path):
            return super().send_head()
        data = Path(path).read_bytes()
        first, _, last = spec[len("bytes="):].partition("-")
        size = len(data)
        if first == "":  # suffix: the last N bytes
            start, stop = max(0, size - int(last)), size
        else:
            start, stop = int(first), min(size, int(last) + 1) if last else size
        if start >= size or start >= stop:
            self.send_error(416, "range not satisfiable")
            return None
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(data[start:stop])

    def log_message(self, format, *args):  # noqa: A002 - http.server signature
        return


@dataclass
class HttpServer:
    url: str
    folder: Path
    requests: list[str] = field(default_factory=list)  # "GET /path" for every request served

    def methods(self) -> set[str]:
        return {r.split(" ", 1)[0] for r in self.requests}


@contextlib.contextmanager
def static_http_server(folder: str | os.PathLike) -> Iterator[HttpServer]:
    """Serve `folder` read-only over plain HTTP on loopback (GET/HEAD only)."""
    folder = Path(folder)
    seen: list[str] = []

    class Handler(_NoListingHandler):
        def handle_one_request(self) -> None:
            super().handle_one_request()
            if getattr(self, "command", None):
                seen.append(f"{self.command} {self.path}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield HttpServer(url=f"http://127.0.0.1:{server.server_address[1]}", folder=folder, requests=seen)
    finally:
        server.shutdown()
        server.server_close()


# -- pytest fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """A moto S3 server for the module, with test credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in TEST_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        clear_s3fs_cache()
        with moto_server() as server:
            yield server
        clear_s3fs_cache()


@pytest.fixture
def http_root(tmp_path) -> Iterator[HttpServer]:
    """A read-only web server for a fresh folder (put stores under `.folder`)."""
    folder = tmp_path / "www"
    folder.mkdir()
    with static_http_server(folder) as server:
        yield server
