"""The demo's accounts and adapters: who the demo contributors and maintainer are, and
which committed adapter folders (demo/adapters/) ``seed_demo --adapters`` uploads.

``make run`` seeds them on a fresh database and follows their evaluation to a live
mixture (routing's ``follow_demo``); both read these names from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from django.conf import settings

# The shuffled-label control, meant to fail admission: uploaded only when asked for.
CONTROL_ADAPTERS = ("unit-conversion-shuffled",)


class DemoUser(NamedTuple):
    username: str
    display_name: str
    is_maintainer: bool
    api_token: bool  # a "demo" API token, printed with the password


DEMO_USERS = (
    DemoUser("maintainer", "Demo Maintainer", is_maintainer=True, api_token=False),
    DemoUser("contributor", "Demo Contributor", is_maintainer=False, api_token=True),
    DemoUser("ada", "Ada Demo", is_maintainer=False, api_token=False),
    DemoUser("noor", "Noor Demo", is_maintainer=False, api_token=False),
)
DEMO_MAINTAINER = next(user.username for user in DEMO_USERS if user.is_maintainer)
DEMO_CONTRIBUTORS = tuple(user.username for user in DEMO_USERS if not user.is_maintainer)


def demo_adapters_root() -> Path:
    return Path(settings.BASE_DIR) / "demo" / "adapters"


def demo_adapter_folders(root: Path, *, with_control: bool = False) -> list[Path]:
    """The demo adapter folders to upload, by name: every one with a metadata.json, less
    the control unless asked for."""
    return [
        folder
        for folder in sorted(root.iterdir())
        if (folder / "metadata.json").is_file()
        and (with_control or folder.name not in CONTROL_ADAPTERS)
    ]
