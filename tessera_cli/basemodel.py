"""The platform's base model on the contributor's machine: its prepared files, fetched once
from the REST API (``GET /api/v1/base-model/`` lists them, each file downloads from
``/api/v1/base-model/files/<name>``) into the user's cache, and reused after.

The cache is keyed by the manifest's ``sha256`` (the digest of every file's sha256 and
name), so a deployment that changes its base model gets a new folder, and two platforms
serving the same files share one::

    <cache>/base-models/<sha256>/config.json, model.safetensors, tokenizer.json, …
    <cache>/base-models/<sha256>/tessera-files.json   the manifest's file list, written last

Files are downloaded into a staging folder beside it, each checked against its size and
sha256 as it streams, and the folder is renamed into place only when all are there: a
broken download never looks finished. A reused copy is hashed again before it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from tessera_cli.api import Platform

FOLDER = "base-models"
RECORD_NAME = "tessera-files.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 16 * 1024 * 1024


class BaseModelError(Exception):
    """The manifest cannot be used, or a file did not arrive as the manifest says."""


@dataclass(frozen=True)
class Manifest:
    name: str
    adapter_base_model_name: str
    weights_sha256: str
    sha256: str
    files: dict[str, dict]  # name -> {"size", "sha256"}

    @property
    def total_size(self) -> int:
        return sum(entry["size"] for entry in self.files.values())


@dataclass(frozen=True)
class LocalCopy:
    folder: Path
    manifest: Manifest
    downloaded: bool  # False: a verified copy was already in the cache


def parse_manifest(body: dict) -> Manifest:
    """The API's manifest, checked before anything is written: every name a plain file
    name (nothing that could land outside the cache folder), every size and sha256
    well-formed, and the listing's sha256 the one the API gave."""
    try:
        files: dict[str, dict] = {}
        for entry in body["files"]:
            name, size, digest = entry["name"], entry["size"], entry["sha256"]
            plain = isinstance(name, str) and name not in ("", ".", "..")
            plain = plain and "/" not in name and "\\" not in name and not name.startswith(".")
            if not plain:
                raise BaseModelError(f"The base model manifest names a file {name!r}.")
            if name == RECORD_NAME or name in files:
                raise BaseModelError(f"The base model manifest lists {name!r} twice or oddly.")
            if not isinstance(size, int) or size < 0 or not _SHA256.match(str(digest)):
                raise BaseModelError(f"The base model manifest's entry for {name} is malformed.")
            files[name] = {"size": size, "sha256": digest}
        manifest = Manifest(
            name=str(body["name"]),
            adapter_base_model_name=str(body["adapter_base_model_name"]),
            weights_sha256=str(body["weights_sha256"]),
            sha256=str(body["sha256"]),
            files=files,
        )
    except (KeyError, TypeError) as exc:
        raise BaseModelError(f"The platform's base model manifest is malformed ({exc}).") from exc
    if not files:
        raise BaseModelError("The platform's base model manifest lists no files.")
    if listing_sha256(files) != manifest.sha256:
        raise BaseModelError("The base model manifest's sha256 does not match its file list.")
    return manifest


def listing_sha256(files: dict[str, dict]) -> str:
    """sha256 of ``<sha256>  <name>`` lines in name order, as ``sha256sum`` prints them."""
    listing = "".join(f"{files[name]['sha256']}  {name}\n" for name in sorted(files))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def cached(root: Path, manifest: Manifest) -> Path | None:
    """The cached folder for this manifest when it is complete and every file hashes as
    listed, else None."""
    folder = root / FOLDER / manifest.sha256
    try:
        if json.loads((folder / RECORD_NAME).read_text()) != manifest.files:
            return None
        for name, entry in manifest.files.items():
            path = folder / name
            if path.stat().st_size != entry["size"] or _sha256_file(path) != entry["sha256"]:
                return None
    except (OSError, ValueError):
        return None
    return folder


def fetch(
    platform: Platform,
    manifest: Manifest,
    root: Path,
    *,
    progress: bool = True,
    out: TextIO | None = None,
) -> LocalCopy:
    """The base model's folder in the cache under ``root``: the verified copy already
    there, or one downloaded now (with a progress line on stderr)."""
    out = out or sys.stdout
    folder = cached(root, manifest)
    if folder is not None:
        print(f"Using the cached base model {manifest.name} ({folder}, verified).", file=out)
        return LocalCopy(folder=folder, manifest=manifest, downloaded=False)
    parent = root / FOLDER
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / manifest.sha256
    _remove_abandoned_staging(parent)
    staging = parent / f".partial-{manifest.sha256[:16]}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    print(
        f"Downloading the base model {manifest.name} ({len(manifest.files)} files, "
        f"{manifest.total_size / 1e6:.1f} MB) from {platform.url} into {final} …",
        file=out,
        flush=True,
    )
    try:
        with tqdm(
            total=manifest.total_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="base model",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not progress,
        ) as bar:
            for name in sorted(manifest.files):
                _download(platform, name, manifest.files[name], staging / name, bar)
        (staging / RECORD_NAME).write_text(json.dumps(manifest.files, indent=2, sort_keys=True))
        if final.exists():  # a damaged copy (cached() refused it), or another run's
            if cached(root, manifest) is not None:
                shutil.rmtree(staging)
                return LocalCopy(folder=final, manifest=manifest, downloaded=True)
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return LocalCopy(folder=final, manifest=manifest, downloaded=True)


def _download(platform: Platform, name: str, entry: dict, path: Path, bar: tqdm) -> None:
    digest = hashlib.sha256()
    received = 0
    with open(path, "wb") as handle:

        def write(chunk: bytes) -> None:
            nonlocal received
            received += len(chunk)
            if received > entry["size"]:
                raise BaseModelError(f"{name} is larger than the manifest says; run again.")
            handle.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))

        platform.download_base_model_file(name, write)
    if received != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise BaseModelError(
            f"{name} arrived with {received} bytes and sha256 {digest.hexdigest()}; the "
            f"manifest says {entry['size']} bytes and {entry['sha256']}. Run again; if it "
            "persists, the platform's copy changed during the download."
        )


def _remove_abandoned_staging(parent: Path) -> None:
    """Staging folders of runs that are gone (killed mid-download)."""
    for staging in parent.glob(".partial-*-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The platform hashes its own copy the same way (contributions.base_models), but that module
# needs Django's settings: the command line runs on a contributor's machine without them.
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load(folder: Path):
    """(model, tokenizer) from the cached folder, as the platform loads its copy: local
    files only, safetensors only, never remote code; float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    return model, tokenizer
