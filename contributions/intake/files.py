"""From the uploaded parts to the adapter's three files: which names are allowed, how an
archive is laid out, and the model card's rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from contributions.intake import archive
from contributions.intake.base import IntakeError, IntakeLimits, UploadPart

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
_REQUIRED = (CONFIG_NAME, WEIGHTS_NAME)
_ALLOWED = frozenset({CONFIG_NAME, WEIGHTS_NAME, CARD_NAME})
CARD_MAX_BYTES = 256 * 1024
# Formats that are pickles (or zip files of pickles, as torch.save writes): loading one runs code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Compressed or archive formats other than the two we unpack; inside an archive, any of these
# (or a supported one) is a nested archive.
_ARCHIVE_SUFFIXES = (
    ".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz2", ".xz", ".txz", ".zst", ".lz4", ".7z", ".rar",
)  # fmt: skip


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes
    weights: bytes
    card: bytes | None


def collect_files(parts: Sequence[UploadPart], limits: IntakeLimits) -> AdapterFiles:
    if not parts:
        raise IntakeError("upload_empty", "The upload contains no files.")
    total = sum(len(part.data) for part in parts)
    if total > limits.max_upload_bytes:
        raise IntakeError(
            "upload_too_large",
            f"The upload is {total} bytes; the limit is {limits.max_upload_bytes} bytes.",
            kind="too_large",
            details={"size_bytes": total, "max_bytes": limits.max_upload_bytes},
        )
    for part in parts:
        _refuse_pickle(part.name)
    archives = [part for part in parts if archive.is_supported_archive(part.name)]
    if archives:
        if len(parts) > 1:
            raise IntakeError(
                "upload_archive_not_alone",
                "An archive must be the only file uploaded; send either one archive or the "
                "adapter's files.",
            )
        files = _files_of_archive(archives[0], limits)
    else:
        for part in parts:
            if part.name.lower().endswith(_ARCHIVE_SUFFIXES):
                raise IntakeError(
                    "upload_unsupported_archive",
                    f"The archive {part.name!r} is in a format we do not unpack; use .zip, .tar.gz "
                    "or .tgz.",
                    details={"name": part.name},
                )
        files = [(part.name, part.data) for part in parts]
    return _pick_adapter_files(files)


def _files_of_archive(part: UploadPart, limits: IntakeLimits) -> list[tuple[str, bytes]]:
    members = archive.extract(part.name, part.data, limits)
    for member in members:
        name = "/".join(member.path)
        _refuse_pickle(name)
        if name.lower().endswith(_ARCHIVE_SUFFIXES):
            raise IntakeError(
                "archive_nested",
                f"The archive contains another archive, {name!r}; archives inside archives "
                "are not unpacked.",
                details={"member": name},
            )
    _check_layout(members)
    return [(member.path[-1], member.data) for member in members]


def _check_layout(members: list[archive.Member]) -> None:
    """Accept the files at the archive's top, or all inside one top-level folder (what zipping
    the folder PEFT's save_pretrained wrote gives)."""
    depths = {len(member.path) for member in members}
    folders = {member.path[0] for member in members}
    if depths <= {1} or (depths == {2} and len(folders) == 1):
        return
    raise IntakeError(
        "archive_bad_layout",
        "The archive's files must all sit at its top or all inside one top-level folder.",
    )


def _pick_adapter_files(files: list[tuple[str, bytes]]) -> AdapterFiles:
    found: dict[str, bytes] = {}
    for name, data in files:
        if name in found:
            raise IntakeError(
                "upload_duplicate_file", f"The file {name!r} is sent twice.", details={"name": name}
            )
        if name not in _ALLOWED:
            raise IntakeError(
                "upload_unexpected_file",
                f"The file {name!r} is not part of an adapter; send only {CONFIG_NAME}, "
                f"{WEIGHTS_NAME} and optionally {CARD_NAME}.",
                details={"name": name},
            )
        if not data:
            raise IntakeError(
                "upload_empty_file", f"The file {name!r} is empty.", details={"name": name}
            )
        found[name] = data
    for name in _REQUIRED:
        if name not in found:
            raise IntakeError(
                "upload_missing_file",
                f"The file {name} is missing from the upload.",
                details={"name": name},
            )
    card = found.get(CARD_NAME)
    if card is not None:
        _check_card(card)
    return AdapterFiles(config=found[CONFIG_NAME], weights=found[WEIGHTS_NAME], card=card)


def _refuse_pickle(name: str) -> None:
    if name.lower().endswith(_PICKLE_SUFFIXES):
        raise IntakeError(
            "upload_pickle_refused",
            f"The file {name!r} is in a pickle-based format, which can run code when loaded; "
            f"send the weights as {WEIGHTS_NAME}.",
            details={"name": name},
        )


def _check_card(card: bytes) -> None:
    if len(card) > CARD_MAX_BYTES:
        raise IntakeError(
            "upload_card_too_large",
            f"The model card {CARD_NAME} is {len(card)} bytes; the limit is {CARD_MAX_BYTES}.",
            details={"size_bytes": len(card), "max_bytes": CARD_MAX_BYTES},
        )
    try:
        card.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntakeError(
            "upload_card_not_text", f"The model card {CARD_NAME} is not UTF-8 text."
        ) from exc
