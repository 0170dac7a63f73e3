"""Create a demo maintainer and a demo contributor, printing their logins and a token once.

Idempotent: on later runs the accounts exist and nothing secret is printed again
(``--reset`` issues fresh passwords and a fresh token). ``--adapters`` also uploads the
committed demo skill adapters (demo/adapters/) as the demo contributor, once: they go
through intake and evaluation like any upload, then wait for the demo maintainer's review.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from contributions import services
from contributions.intake import UploadPart
from contributions.models import Adapter, ApiToken

DEMO_ADAPTERS = ("unit-conversion", "date-formatting", "word-reversal")
DEMO_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
DEMO_USERS = (
    ("maintainer", "Demo Maintainer", True),
    ("contributor", "Demo Contributor", False),
)


class Command(BaseCommand):
    help = "Create the demo maintainer and contributor accounts (prints secrets only once)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--reset", action="store_true", help="Issue new passwords and a new demo token."
        )
        parser.add_argument(
            "--adapters",
            action="store_true",
            help="Upload the demo skill adapters as the demo contributor (evaluated as usual).",
        )

    def handle(self, *args, reset: bool = False, adapters: bool = False, **options):
        with transaction.atomic():
            self.accounts(reset=reset)
        if adapters:
            self.demo_adapters()

    def demo_adapters(self) -> None:
        owner = get_user_model().objects.get(username="contributor")
        root = Path(settings.BASE_DIR) / "demo" / "adapters"
        for name in DEMO_ADAPTERS:
            metadata = json.loads((root / name / "metadata.json").read_text())
            if Adapter.objects.filter(owner=owner, slug=metadata["slug"]).exists():
                continue
            with transaction.atomic():  # the evaluation is queued when this commits
                adapter = services.adapter_create(owner=owner, **metadata)
                version = services.adapter_version_create(
                    adapter=adapter,
                    actor=owner,
                    parts=[
                        UploadPart(name=file, data=(root / name / file).read_bytes())
                        for file in DEMO_FILES
                    ],
                )
            self.stdout.write(f"Uploaded demo adapter {adapter} ({version.status}).")

    def accounts(self, *, reset: bool) -> None:
        User = get_user_model()
        for username, display_name, is_maintainer in DEMO_USERS:
            user = User.objects.filter(username=username).first()
            if user is not None and not reset:
                self.stdout.write(
                    f"Demo account '{username}' exists (use --reset for new secrets)."
                )
                continue
            password = secrets.token_urlsafe(12)
            if user is None:
                contributor = services.contributor_sign_up(
                    username=username,
                    email=f"{username}@tessera.localhost",
                    password=password,
                    display_name=display_name,
                    affiliation="Tessera demo",
                )
                user = contributor.user
            else:
                user.set_password(password)
                user.save(update_fields=["password"])
            if is_maintainer:
                services.maintainer_grant(user=user)
            self.stdout.write(self.style.SUCCESS(f"{username:12} password: {password}"))
            if not is_maintainer:
                ApiToken.objects.filter(user=user, name="demo", revoked_at__isnull=True).delete()
                _, key = services.api_token_create(user=user, name="demo")
                self.stdout.write(self.style.SUCCESS(f"{'':12} API token: {key}"))
        self.stdout.write("These secrets are shown once; save them now.")
