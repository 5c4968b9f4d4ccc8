"""URIs for shared storage: a local folder, an NFS mount (also a local path), or ``s3://bucket/prefix``.

S3 goes through pyarrow's S3FileSystem. The endpoint comes from ``AWS_ENDPOINT_URL`` (or
``CHATRAY_S3_ENDPOINT``) so that the same code talks to AWS, MinIO or a local moto server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from chatray.errors import ChatrayError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

__all__ = [
    "copy_dir",
    "download_dir",
    "exists",
    "filesystem_for",
    "is_remote",
    "join",
    "read_text",
    "s3_filesystem",
    "upload_dir",
    "write_text",
]


def is_remote(uri: str) -> bool:
    """True for object-store URIs (``s3://``); False for local and NFS paths."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI, with ``/`` separators for URIs."""
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])
    return str(Path(uri.removeprefix("file://"), *parts))


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem honouring ``AWS_ENDPOINT_URL``/``CHATRAY_S3_ENDPOINT`` and AWS_* credentials."""
    import pyarrow.fs as pafs

    endpoint = os.environ.get("CHATRAY_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, hostport = endpoint.partition("://")
        kwargs["endpoint_override"] = hostport or endpoint
        kwargs["scheme"] = scheme if hostport else "https"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it.

    Raises:
        ChatrayError: for a scheme chatray does not support.
    """
    import pyarrow.fs as pafs

    uri = str(uri)
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        raise ChatrayError(f"unsupported storage scheme {scheme!r} in {uri}",
                           hint="use a local/NFS path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).expanduser().resolve())


def exists(uri: str) -> bool:
    """Whether a file or folder exists at ``uri``."""
    import pyarrow.fs as pafs

    fs, path = filesystem_for(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    """Read a small UTF-8 text file from ``uri``."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError as e:
        raise ChatrayError(f"not found: {uri}") from e
    except OSError as e:
        if "NoSuchKey" in str(e) or "not found" in str(e).lower() or "does not exist" in str(e):
            raise ChatrayError(f"not found: {uri}") from e
        raise


def write_text(uri: str, text: str) -> None:
    """Write a small UTF-8 text file to ``uri`` (parents created)."""
    fs, path = filesystem_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder tree between any two supported locations (local, NFS, S3)."""
    import pyarrow.fs as pafs

    sfs, spath = filesystem_for(src)
    dfs, dpath = filesystem_for(dst)
    dfs.create_dir(dpath, recursive=True)
    pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs, use_threads=True)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to ``uri`` (a no-op copy for local destinations is still a real copy)."""
    copy_dir(str(local_dir), uri)


def download_dir(uri: str, local_dir: str | Path) -> Path:
    """Copy the folder at ``uri`` into ``local_dir``; returns the local path."""
    copy_dir(uri, str(local_dir))
    return Path(local_dir)
