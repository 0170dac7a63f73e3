"""Adapter files built in memory for tests: a real PEFT adapter for the tiny base model, and
the hostile variants intake must refuse (archives with traversal names, links, nested archives
and bombs; safetensors files with hand-written headers; edited configs).

Everything returns bytes; nothing is left on disk. ``real_adapter`` is cached per process, so
call it freely::

    adapter = real_adapter()                      # float32, r=4, alpha=8, q_proj + v_proj
    validate_upload(adapter.parts(), ...)          # two UploadParts
    validate_upload(upload({"adapter.zip": zip_bytes(adapter.files())}), ...)
"""

from __future__ import annotations

import functools
import io
import json
import struct
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from contributions.intake import UploadPart
from tests.support.tiny_model import tiny_llama_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"

Members = Mapping[str, bytes] | Iterable[tuple[str, bytes]]  # pairs allow repeated names


@dataclass(frozen=True)
class AdapterFiles:
    """The three files PEFT's save_pretrained wrote."""

    config: bytes  # adapter_config.json
    weights: bytes  # adapter_model.safetensors
    card: bytes  # README.md (PEFT's model card template)

    def files(self, *, card: bool = False) -> dict[str, bytes]:
        """{file name: bytes}, the card included only when asked for."""
        files = {CONFIG_NAME: self.config, WEIGHTS_NAME: self.weights}
        if card:
            files[CARD_NAME] = self.card
        return files

    def parts(self, *, card: bool = False) -> list[UploadPart]:
        """The files as separate upload parts."""
        return upload(self.files(card=card))


@functools.cache
def real_adapter(
    dtype: str = "float32",
    *,
    rank: int = 4,
    lora_alpha: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> AdapterFiles:
    """A real PEFT LoRA adapter for tests.support.tiny_model's base, saved in ``dtype``
    ("float32", "float16" or "bfloat16"). Deterministic for a ``seed``; about a second the
    first time."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # transformers' deprecation chatter, not ours to fix
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_config(tiny_llama_config())
        model = get_peft_model(
            base,
            LoraConfig(
                r=rank,
                lora_alpha=lora_alpha,
                target_modules=list(target_modules),
                task_type="CAUSAL_LM",
            ),
        )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: the adapter would change nothing
                    parameter.normal_(std=0.02)
        model.to(getattr(torch, dtype))
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            saved = Path(folder)
            return AdapterFiles(
                config=(saved / CONFIG_NAME).read_bytes(),
                weights=(saved / WEIGHTS_NAME).read_bytes(),
                card=(saved / CARD_NAME).read_bytes(),
            )


def upload(files: Members) -> list[UploadPart]:
    """Upload parts from {name: bytes} or (name, bytes) pairs."""
    return [UploadPart(name=name, data=data) for name, data in _pairs(files)]


def config_dict(config: bytes) -> dict[str, Any]:
    return json.loads(config)


def mutated_config(
    config: bytes, changes: Mapping[str, Any] | None = None, *, drop: Iterable[str] = ()
) -> bytes:
    """adapter_config.json bytes with keys set from ``changes`` and the keys in ``drop`` removed."""
    edited = config_dict(config)
    edited.update(changes or {})
    for key in drop:
        edited.pop(key, None)
    return json.dumps(edited, indent=2).encode()


def zip_bytes(
    members: Members,
    *,
    symlinks: Mapping[str, str] | None = None,
    compression: int = zipfile.ZIP_DEFLATED,
) -> bytes:
    """A zip of ``members`` (names used verbatim, so "../x" and "/x" work) plus, for each
    ``symlinks`` {name: target}, an entry whose Unix mode says symbolic link."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # zipfile warns about the repeated names we may want
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
            for name, data in _pairs(members):
                archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
            for name, target in (symlinks or {}).items():
                info = zipfile.ZipInfo(name)
                info.external_attr = (0o120777) << 16  # S_IFLNK | rwxrwxrwx
                archive.writestr(info, target)
    return buffer.getvalue()


def tar_gz_bytes(
    members: Members,
    *,
    directories: Iterable[str] = (),
    symlinks: Mapping[str, str] | None = None,
    hardlinks: Mapping[str, str] | None = None,
    devices: Iterable[str] = (),
    fifos: Iterable[str] = (),
) -> bytes:
    """A gzipped tar of ``directories`` first, then ``members`` (names verbatim), then the
    given symbolic links, hard links {name: target}, character devices and FIFOs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in directories:
            archive.addfile(_tar_info(name, tarfile.DIRTYPE))
        for name, data in _pairs(members):
            info = _tar_info(name, tarfile.REGTYPE)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                info = _tar_info(name, kind)
                info.linkname = target
                archive.addfile(info)
        for kind, names in ((tarfile.CHRTYPE, devices), (tarfile.FIFOTYPE, fifos)):
            for name in names:
                archive.addfile(_tar_info(name, kind))
    return buffer.getvalue()


def zip_bomb_with_lying_sizes(name: str, *, inflated_bytes: int, declared_bytes: int) -> bytes:
    """A zip whose one member inflates to ``inflated_bytes`` of zeros while both its local and
    central headers declare ``declared_bytes`` (the CRC is the true one of all the data)."""
    archive = bytearray(zip_bytes({name: bytes(inflated_bytes)}))
    declared = struct.pack("<I", declared_bytes)
    # Uncompressed size: offset 22 in the local header (the first, at 0), 24 in the central one.
    archive[22:26] = declared
    central = _central_directory_entries(archive)[0]
    archive[central + 24 : central + 28] = declared
    return bytes(archive)


def zip_marked_encrypted(archive: bytes) -> bytes:
    """The zip with the "encrypted" flag set in every central directory entry (the data stay
    plain: zipfile cannot write encrypted members)."""
    marked = bytearray(archive)
    for entry in _central_directory_entries(marked):
        (flags,) = struct.unpack_from("<H", marked, entry + 8)
        struct.pack_into("<H", marked, entry + 8, flags | 0x1)
    return bytes(marked)


def _central_directory_entries(archive: bytes | bytearray) -> list[int]:
    """Offsets of the central directory entries, read from the end-of-central-directory record."""
    end = archive.rindex(b"PK\x05\x06")
    (count,) = struct.unpack_from("<H", archive, end + 10)
    (position,) = struct.unpack_from("<I", archive, end + 16)
    entries = []
    for _ in range(count):
        entries.append(position)
        lengths = struct.unpack_from("<HHH", archive, position + 28)  # name, extra, comment
        position += 46 + sum(lengths)
    return entries


def tar_gz_with_pax_bomb(members: Members, *, pax_bytes: int) -> bytes:
    """A tar.gz whose first member carries a pax extended header of ``pax_bytes`` characters:
    tarfile reads such a record into memory whole, and it is not a member with a size."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for index, (name, data) in enumerate(_pairs(members)):
            info = _tar_info(name, tarfile.REGTYPE)
            info.size = len(data)
            if index == 0:
                info.pax_headers = {"comment": "x" * pax_bytes}
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def safetensors_bytes(
    header: Mapping[str, Any] | bytes, data: bytes = b"", *, header_length: int | None = None
) -> bytes:
    """A safetensors file written by hand: the 8-byte little-endian header length (the true
    one, or ``header_length`` to lie), the header (a mapping dumped as JSON, or raw bytes),
    then ``data``. Nothing is checked, so any hostile header can be made."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_length is None else header_length
    return struct.pack("<Q", length) + raw + data


# Bytes per element of the safetensors dtypes tests use.
_ITEMSIZE = {
    **{"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1},
    **{"I64": 8, "I32": 4, "U8": 1, "BOOL": 1},
}


def laid_out_safetensors(tensors: Mapping[str, tuple[str, Sequence[int]]]) -> bytes:
    """A well-formed safetensors file of zero-filled tensors {name: (dtype, shape)}, laid out
    back to back, for dtypes torch may not save (I64 and the like)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = _ITEMSIZE[dtype]
        for dim in shape:
            size *= dim
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    return safetensors_bytes(header, bytes(offset))


def _pairs(members: Members) -> list[tuple[str, bytes]]:
    return list(members.items()) if isinstance(members, Mapping) else list(members)


def _tar_info(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info
