"""Where the landing zone and the update history keep their files: a local folder, or an
object-store URL (`s3://bucket/prefix`, `gs://…`, `abfs://…`) opened through pyarrow's filesystems.

Credentials never travel in the URL: the object store's own environment variables and files give
them (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an S3-compatible
server, or an instance role), so a URL can be shown, logged and kept in run storage as it is.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from persona_pipeline.secrets import mask_url
from persona_pipeline.settings import is_storage_url


class StorageLocationError(ValueError):
    """A location that cannot be used, in one line naming the setting and what is wrong."""


@dataclass(frozen=True)
class Location:
    """A root folder on a filesystem: `root` is the filesystem's own path of it (an absolute local
    path, or `bucket/prefix`), `shown` how messages name it."""

    filesystem: pafs.FileSystem
    root: str
    shown: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def shown_path(self, *parts: str) -> str:
        return posixpath.join(self.shown, *parts) if parts else self.shown

    def entries(self, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """What is in `folder` (a path of this filesystem): nothing when it does not exist."""
        selector = pafs.FileSelector(folder, allow_not_found=True, recursive=recursive)
        return self.filesystem.get_file_info(selector)

    def info(self, path: str) -> pafs.FileInfo:
        return self.filesystem.get_file_info(path)

    def open_input(self, path: str) -> pa.NativeFile:
        """The bytes of `path` as stored (pyarrow would otherwise decompress a `.gz` itself)."""
        return self.filesystem.open_input_stream(path, compression=None)

    def read_bytes(self, path: str) -> bytes:
        with self.open_input(path) as stream:
            return stream.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """One object written whole: an object store shows the old object or the new one."""
        if self.is_local:
            self.filesystem.create_dir(posixpath.dirname(path), recursive=True)
        with self.filesystem.open_output_stream(path, compression=None) as stream:
            stream.write(data)

    def delete_file(self, path: str) -> None:
        """Remove `path` if it is there."""
        if self.info(path).type != pafs.FileType.NotFound:
            self.filesystem.delete_file(path)


def open_location(where: str | Path, setting: str) -> Location:
    """The location `where` names: a local path (`~` expanded, made absolute) or a storage URL.
    A URL pyarrow cannot open, or one carrying credentials, is refused in one line naming
    `setting`; the URL's credentials never appear in the message."""
    text = str(where)
    if not is_storage_url(text):
        path = Path(text.removeprefix("file://")).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), str(path), str(path))
    shown = mask_url(text)
    if shown != text:
        raise StorageLocationError(
            f"{setting}={shown}: credentials do not go in the URL; give them through the object "
            "store's environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3) or an instance role"
        )
    try:
        filesystem, root = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = mask_url(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise StorageLocationError(f"{setting}={shown}: cannot be opened ({reason})") from None
    return Location(filesystem, root.rstrip("/"), shown.split("?", 1)[0].rstrip("/"))
