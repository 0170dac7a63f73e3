"""What a push sends: an adapter folder's files, and the adapter's metadata from the
folder's ``metadata.json`` and the command's flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
METADATA_NAME = "metadata.json"

# The fields of the REST API's adapter (``POST /api/v1/adapters/``). Anything else in a
# metadata.json, like the demo's "contributor" (who owns it in the demo), is not sent.
ADAPTER_FIELDS = (
    "slug",
    "title",
    "description",
    "task_tags",
    "languages",
    "license",
    "intended_use",
    "training_data_summary",
    "example_prompts",
    "visibility",
)


class IntakeError(Exception):
    """A problem with the local folder or metadata, found before anything is sent."""


def adapter_files(folder: Path) -> list[tuple[str, bytes]]:
    """The adapter's files in ``folder`` that exist: the two PEFT files and the README.md
    card when there is one. Which of them must be there, and what they must hold, is the
    platform's intake to say: a folder missing one is sent as it is and refused there."""
    if not folder.is_dir():
        raise IntakeError(f"{folder} is not a folder.")
    files = [
        (name, (folder / name).read_bytes()) for name in ADAPTER_FILES if (folder / name).is_file()
    ]
    if not files:
        raise IntakeError(
            f"{folder} holds none of {', '.join(ADAPTER_FILES)}: is it a PEFT adapter folder?"
        )
    return files


def read_metadata(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise IntakeError(f"Cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise IntakeError(f"{path} must hold a JSON object.")
    return {key: data[key] for key in ADAPTER_FIELDS if key in data}


def adapter_fields(
    metadata: dict,
    *,
    slug: str | None = None,
    title: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    private: bool = False,
) -> dict:
    """metadata.json's fields with the flags given on the command line over them."""
    fields = dict(metadata)
    if slug:
        fields["slug"] = slug
    if title:
        fields["title"] = title
    if license:
        fields["license"] = license
    if tags is not None:
        fields["task_tags"] = [tag.strip() for tag in tags.split(",") if tag.strip()]
    if private:
        fields["visibility"] = "private"
    return fields


def slug_from(name: str) -> str:
    """A slug the API accepts from a folder or repository name: lowercase letters, digits
    and single hyphens, at most 64."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug[:64].rstrip("-") or "adapter"
