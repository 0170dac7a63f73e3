"""Where the command line keeps the platform URL, the inference URL and the API token.

One JSON file, readable by its owner only (0600) since it holds a bearer token, in the
user's config directory: ``$TESSERA_CONFIG_DIR`` when set (tests, several accounts), else
platformdirs' config dir when platformdirs is installed, else ``$XDG_CONFIG_HOME/tessera``
(``~/.config/tessera``).

What ``tessera train`` downloads (the base model's files) goes to the user's cache
directory instead, found the same way: ``$TESSERA_CACHE_DIR``, platformdirs' cache dir, else
``$XDG_CACHE_HOME/tessera`` (``~/.cache/tessera``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

FILE_NAME = "config.json"


class NotLoggedIn(Exception):
    pass


@dataclass(frozen=True)
class Config:
    url: str  # the platform, e.g. http://127.0.0.1:8000 (the REST API is under /api/v1/)
    inference_url: str  # the inference API's base, e.g. http://127.0.0.1:8001/v1
    token: str


def config_dir() -> Path:
    return _user_dir("TESSERA_CONFIG_DIR", "XDG_CONFIG_HOME", ".config", "user_config_dir")


def cache_dir() -> Path:
    return _user_dir("TESSERA_CACHE_DIR", "XDG_CACHE_HOME", ".cache", "user_cache_dir")


def _user_dir(override: str, xdg: str, home_default: str, platformdirs_name: str) -> Path:
    """``$override``, else platformdirs' folder for tessera, else the XDG one by hand."""
    if os.environ.get(override):
        return Path(os.environ[override])
    try:
        import platformdirs
    except ImportError:
        base = os.environ.get(xdg) or Path.home() / home_default
        return Path(base) / "tessera"
    return Path(getattr(platformdirs, platformdirs_name)("tessera"))


def config_path() -> Path:
    return config_dir() / FILE_NAME


def save(config: Config) -> Path:
    """Write the file with mode 0600 from the start (never briefly world-readable), replacing
    any earlier one atomically."""
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / FILE_NAME
    partial = folder / f".{FILE_NAME}.{os.getpid()}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(config), handle, indent=2)
            handle.write("\n")
        os.chmod(partial, 0o600)  # the umask may have narrowed it further; never widened
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def load_stored() -> dict:
    path = config_path()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise NotLoggedIn(f"Cannot read {path}: {exc}. Run `tessera login` again.") from exc


def load() -> Config:
    """The stored login, with ``TESSERA_URL``, ``TESSERA_INFERENCE_URL`` and
    ``TESSERA_TOKEN`` taking precedence (CI jobs set them instead of logging in)."""
    stored = load_stored()
    url = os.environ.get("TESSERA_URL") or stored.get("url")
    token = os.environ.get("TESSERA_TOKEN") or stored.get("token")
    if not url or not token:
        raise NotLoggedIn("Not logged in: run `tessera login` first (or set TESSERA_TOKEN).")
    inference_url = (
        os.environ.get("TESSERA_INFERENCE_URL")
        or stored.get("inference_url")
        or default_inference_url(url)
    )
    return Config(url=url, inference_url=inference_url, token=token)


def default_inference_url(platform_url: str) -> str:
    """The inference server of a standard deployment: the platform's host, port 8001 (as
    ``make run`` and docker compose start it). The REST API does not say where it is, so
    this is only the fallback to ``--inference-url``."""
    from urllib.parse import urlsplit

    parts = urlsplit(platform_url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:  # an IPv6 literal goes back in brackets
        host = f"[{host}]"
    return f"{parts.scheme or 'http'}://{host}:8001/v1"
