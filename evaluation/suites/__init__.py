"""The built-in benchmark suites: committed public parts, secret parts drawn from a seed.

The files here hold each suite's header, its tasks and its public split (and, under
``train/``, the training data); they are what anyone can read. The hidden and paraphrase
splits, which decide admission and the public scoreboard, are never committed: they are
drawn at deployment time from the secret seed ``TESSERA_SUITE_SEED`` by ``generate.py``
(away from every committed key), or read from private files a maintainer provides, and
merged into the committed files by ``complete_suites`` (what ``manage.py load_suites``
imports).
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from evaluation.suite_io import merged_jsonl
from evaluation.suites import generate

HERE = Path(__file__).resolve().parent
SEED_FILE = "suite-seed"  # under VAR_DIR: the development seed, made on first use
MIN_SEED_LENGTH = 16


@functools.lru_cache(maxsize=4)
def _secret_parts(seed: str) -> dict[str, bytes]:
    return {slug: text.encode() for slug, text in generate.secret_suites(seed).items()}


def committed_files(directory: Path = HERE) -> list[Path]:
    return sorted(Path(directory).glob("*.jsonl"))


def complete_suite(
    path: Path, *, seed: str | None = None, private: Mapping[str, bytes] | None = None
) -> bytes:
    """The suite file at ``path`` made whole: its bytes followed by the secret part, from
    ``private`` (by suite slug) when it has one for this suite, else drawn from ``seed``
    (default: ``suite_seed()``). A suite the generator does not know and no private file
    covers is returned as it is (suite_io then says what it lacks)."""
    data = Path(path).read_bytes()
    slug = Path(path).stem
    if private and slug in private:
        return merged_jsonl(public=data, secret=private[slug])
    parts = _secret_parts(seed or suite_seed())
    if slug not in parts:
        return data
    return merged_jsonl(public=data, secret=parts[slug])


def suite_seed() -> str:
    """The secret seed: ``settings.TESSERA_SUITE_SEED``; in development (DEBUG on) with none
    set, a random one made once and kept in ``VAR_DIR/suite-seed``, so a fresh clone works
    with no setting and keeps its splits from one load to the next. Outside Django (the
    benchmark and measuring scripts) the TESSERA_SUITE_SEED environment variable, else the
    same development file."""
    from django.conf import settings

    if settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"):
        seed = str(getattr(settings, "TESSERA_SUITE_SEED", "") or "")
        var_dir = Path(settings.VAR_DIR)
    else:
        seed = os.environ.get("TESSERA_SUITE_SEED", "")
        var_dir = HERE.parents[1] / os.environ.get("TESSERA_VAR_DIR", "var")
    if seed:
        return seed
    return _development_seed(var_dir / SEED_FILE)


def _development_seed(path: Path) -> str:
    if path.is_file():
        seed = path.read_text(encoding="utf-8").strip()
        if seed:
            return seed
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside, then linked into place: two processes starting at once (the web server
    # and the worker) agree on whichever seed was linked first.
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(secrets.token_hex(16) + "\n", encoding="utf-8")
    temporary.chmod(0o600)
    try:
        os.link(temporary, path)
    except FileExistsError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    seed = path.read_text(encoding="utf-8").strip()
    if not seed:
        raise ImproperlyConfigured(f"{path} is empty: delete it to draw a new seed.")
    return seed
