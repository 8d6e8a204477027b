"""Media in S3-compatible object storage: ``wanpipe serve --media s3://bucket/prefix``.

boto3 finds the endpoint and the credentials as it does for any AWS program: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``; unset: AWS itself), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE`` and the shared config
files. A small object is stored with one ``PutObject``; a video goes through boto3's upload, whose
multipart upload is completed only once every part is in (and aborted on failure): a key never holds a
partial object. Starting checks the bucket (``HeadBucket``) with short timeouts, so a missing bucket, an
unreachable endpoint or refused credentials stop the server at once with one line.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from wanpipe.serving.media_store import MediaConfigError, MediaStore

PRESIGNED_SECONDS = 3600  # how long a --media-redirect URL serves its video
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at its ends); MediaConfigError."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise MediaConfigError(f"--media {url}: expected s3://BUCKET or s3://BUCKET/PREFIX")
    if not _BUCKET.fullmatch(parts.netloc):
        raise MediaConfigError(
            f"--media {url}: {parts.netloc!r} is not a bucket name (3-63 lowercase letters, digits, '.', '-')"
        )
    if parts.query or parts.fragment:
        raise MediaConfigError(f"--media {url}: an s3:// URL has no query or fragment")
    return parts.netloc, parts.path.strip("/")


class _Body:
    """A ``GetObject`` body as a binary stream, with its ``size``."""

    def __init__(self, body: Any, size: int | None):
        self._body = body
        self.size = size

    def read(self, n: int = -1) -> bytes:
        return self._body.read(None if n < 0 else n)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Media(MediaStore):
    """Keys as objects ``<prefix>/<key>`` in one bucket. Thread-safe (a boto3 client is)."""

    shared = True

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None, redirect: bool = False):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.redirect = redirect
        self.client = client if client is not None else _client()
        self.where = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    @classmethod
    def from_url(cls, url: str, *, redirect: bool = False) -> S3Media:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, redirect=redirect)

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise MediaConfigError(
                f"--media {self.where}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ) from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                what = f"the bucket {self.bucket!r} does not exist at {self.endpoint}"
            elif code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                what = f"access to the bucket {self.bucket!r} at {self.endpoint} is denied (credentials?)"
            else:
                what = f"the bucket {self.bucket!r} at {self.endpoint} answers {code or e}"
            raise MediaConfigError(f"--media {self.where}: {what}") from None
        except BotoCoreError as e:  # unreachable endpoint, timeouts, a bad endpoint URL
            raise MediaConfigError(
                f"--media {self.where}: cannot reach the S3 endpoint {self.endpoint} ({e})"
            ) from None

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._name(key), Body=data)

    @contextlib.contextmanager
    def writing(self, key: str, suffix: str = "") -> Iterator[Path]:
        fd, name = tempfile.mkstemp(prefix="wanpipe-media-", suffix=suffix)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            self.client.upload_file(str(tmp), self.bucket, self._name(key))
        finally:
            tmp.unlink(missing_ok=True)

    def _missing(self, error: Exception) -> bool:
        from botocore.exceptions import ClientError

        return isinstance(error, ClientError) and str(error.response.get("Error", {}).get("Code")) in (
            "404",
            "NoSuchKey",
            "NotFound",
        )

    def open(self, key: str) -> BinaryIO:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as e:
            if self._missing(e):
                raise FileNotFoundError(f"{self.where}/{key}") from None
            raise
        return _Body(answer["Body"], answer.get("ContentLength"))  # type: ignore[return-value]

    def get(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._name(key))
        except Exception as e:
            if self._missing(e):
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def keys(self, prefix: str) -> list[str]:
        start = len(self._name(""))
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._name(prefix)
        )
        return sorted(item["Key"][start:] for page in pages for item in page.get("Contents", ()))

    def presigned_url(self, key: str, *, filename: str, media_type: str) -> str:
        params = {
            "Bucket": self.bucket,
            "Key": self._name(key),
            "ResponseContentType": media_type,
            "ResponseContentDisposition": f'inline; filename="{filename}"',
        }
        return self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=PRESIGNED_SECONDS)


def _client() -> Any:
    """An S3 client from the environment, with short connect timeouts and few retries (a server that cannot
    reach its media should say so in seconds, not minutes)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise MediaConfigError("--media s3://... needs boto3: pip install 'wanpipe[s3]'") from None
    config = Config(
        connect_timeout=3,
        read_timeout=30,
        retries={"max_attempts": 2, "mode": "standard"},
        signature_version="s3v4",
    )
    try:
        return boto3.session.Session().client("s3", config=config)
    except Exception as e:  # a malformed AWS_ENDPOINT_URL, an unknown profile, no region where one is needed
        raise MediaConfigError(f"--media: cannot make an S3 client from the environment ({e})") from None
