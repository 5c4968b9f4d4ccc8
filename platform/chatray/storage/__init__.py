"""Storage: local paths, NFS mounts and ``s3://`` URIs behind one pyarrow filesystem interface."""

from chatray.storage.uri import (
    copy_dir,
    download_dir,
    exists,
    filesystem_for,
    is_remote,
    join,
    read_text,
    upload_dir,
    write_text,
)

__all__ = [
    "copy_dir",
    "download_dir",
    "exists",
    "filesystem_for",
    "is_remote",
    "join",
    "read_text",
    "upload_dir",
    "write_text",
]
