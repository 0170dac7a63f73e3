"""Unpack one uploaded .zip or .tar.gz in memory, refusing anything hostile.

Nothing is ever written to disk, so traversal names could do no harm here; they are refused
anyway because a name like ``../x`` or ``/etc/x`` is never an honest adapter.
"""

from __future__ import annotations

import gzip
import io
import lzma
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass

from contributions.intake.base import IntakeError, IntakeLimits

MAX_MEMBERS = 16
# A decompressed tar stream is member data plus 512-byte headers, pax records and padding to a
# 10 KiB record; this much on top of the data limit is far more than an honest archive needs.
_TAR_OVERHEAD_BYTES = 1024 * 1024
# What the stdlib readers raise on malformed input; anything else is a bug of ours and escapes.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,  # an unknown compression method
    struct.error,
)
_TAR_ERRORS = (tarfile.TarError, zlib.error, EOFError, OSError, ValueError)


@dataclass(frozen=True)
class Member:
    path: tuple[str, ...]  # the name's components, without "" and "." ones
    data: bytes


def is_supported_archive(name: str) -> bool:
    return name.lower().endswith((".zip", ".tar.gz", ".tgz"))


def extract(name: str, data: bytes, limits: IntakeLimits) -> list[Member]:
    """The regular files of the archive ``name`` (directories are skipped: they carry no data)."""
    if name.lower().endswith(".zip"):
        return _extract_zip(data, limits)
    return _extract_tar_gz(data, limits)


def _extract_zip(data: bytes, limits: IntakeLimits) -> list[Member]:
    members: list[Member] = []
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            _check_member_count(len(infos))
            # Declared sizes first: refuses an honest bomb without inflating a byte of it.
            if sum(info.file_size for info in infos) > limits.max_upload_bytes:
                raise _too_large(limits)
            left = limits.max_upload_bytes
            for info in infos:
                # The Unix file type from the high bits; 0 from tools that record none (Windows).
                file_type = stat.S_IFMT(info.external_attr >> 16)
                is_dir = info.is_dir() or file_type == stat.S_IFDIR
                path = _member_path(info.filename, is_dir=is_dir)
                if is_dir:
                    continue
                if file_type not in (0, stat.S_IFREG):
                    raise _not_regular(info.filename, _zip_kind(file_type))
                if info.flag_bits & 0x1:
                    raise _not_regular(info.filename, "an encrypted file")
                with archive.open(info) as member:
                    content = _read_capped(member, left, limits)
                left -= len(content)
                members.append(Member(path, content))
    except _ZIP_ERRORS as exc:
        raise _corrupt("zip") from exc
    return members


def _extract_tar_gz(data: bytes, limits: IntakeLimits) -> list[Member]:
    # We decompress ourselves, through a counter with a hard stop, rather than let tarfile do
    # it: tarfile reads pax and GNU long-name records into memory whole, whatever size they
    # declare, and those are not members whose sizes we could check.
    stream = _CappedReader(
        gzip.GzipFile(fileobj=io.BytesIO(data)),
        cap=limits.max_upload_bytes + _TAR_OVERHEAD_BYTES,
        limits=limits,
    )
    members: list[Member] = []
    left = limits.max_upload_bytes
    try:
        # "r|": a forward-only stream, so nothing needs seeking back through the gzip data.
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for count, info in enumerate(archive, start=1):
                _check_member_count(count)
                path = _member_path(info.name, is_dir=info.isdir())
                if info.isdir():
                    continue
                # Plain files only: not links, devices, FIFOs, contiguous or sparse files
                # (a sparse member's declared size is not the bytes it holds).
                if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or info.sparse:
                    raise _not_regular(info.name, _tar_kind(info))
                if info.size > left:
                    raise _too_large(limits)
                member = archive.extractfile(info)
                assert member is not None  # extractfile returns None only for non-files
                content = _read_capped(member, left, limits)
                left -= len(content)
                members.append(Member(path, content))
    except _TAR_ERRORS as exc:
        raise _corrupt("tar.gz") from exc
    return members


class _CappedReader:
    """A read-only file object that raises archive_too_large once more than ``cap`` bytes
    have come out of ``inner``."""

    def __init__(self, inner: io.BufferedIOBase, *, cap: int, limits: IntakeLimits) -> None:
        self._inner, self._left, self._limits = inner, cap, limits

    def read(self, size: int = -1) -> bytes:
        # An unbounded read would inflate everything first: ask for one byte past the cap.
        want = self._left + 1 if size < 0 else min(size, self._left + 1)
        chunk = self._inner.read(want)
        self._left -= len(chunk)
        if self._left < 0:
            raise _too_large(self._limits)
        return chunk


def _read_capped(member: io.BufferedIOBase, left: int, limits: IntakeLimits) -> bytes:
    # The hard stop: whatever a header declared, never take more than what is left of the limit.
    content = member.read(left + 1)
    if len(content) > left:
        raise _too_large(limits)
    return content


def _member_path(name: str, *, is_dir: bool) -> tuple[str, ...]:
    path = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/") or "\\" in name or ".." in path or not (path or is_dir):
        raise IntakeError(
            "archive_unsafe_path",
            f"The archive member {name!r} has an absolute, parent-directory or empty path; "
            "every file must sit inside the archive under a name.",
            details={"member": name},
        )
    return path


def _check_member_count(count: int) -> None:
    if count > MAX_MEMBERS:
        raise IntakeError(
            "archive_too_many_members",
            f"The archive holds more than {MAX_MEMBERS} entries; an adapter needs at most three "
            "files.",
        )


def _zip_kind(file_type: int) -> str:
    return "a symbolic link" if file_type == stat.S_IFLNK else "not a regular file"


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.isdev():
        return "a device or FIFO"
    return "not a regular file"


def _not_regular(name: str, kind: str) -> IntakeError:
    return IntakeError(
        "archive_unsupported_member",
        f"The archive member {name!r} is {kind}; only plain files are accepted.",
        details={"member": name},
    )


def _too_large(limits: IntakeLimits) -> IntakeError:
    return IntakeError(
        "archive_too_large",
        f"The archive unpacks to more than {limits.max_upload_bytes} bytes.",
        kind="too_large",
        details={"max_bytes": limits.max_upload_bytes},
    )


def _corrupt(kind: str) -> IntakeError:
    return IntakeError("archive_corrupt", f"The {kind} archive is damaged or not a {kind} file.")
