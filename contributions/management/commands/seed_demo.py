"""Create the demo maintainer and demo contributors, printing their logins and a token once.

Idempotent: on later runs the accounts exist and nothing secret is printed again
(``--reset`` issues fresh passwords and a fresh token). ``--adapters`` also uploads every
committed demo adapter (each folder of demo/adapters/ with a metadata.json) as the demo
contributor its metadata names, once: they go through intake and evaluation like any
upload, then wait for the demo maintainer's review. The shuffled-label control, which is
meant to fail admission, is uploaded only with ``--with-control``.
"""

from __future__ import annotations

import json
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from contributions import services
from contributions.demo import (
    DEMO_CONTRIBUTORS,
    DEMO_USERS,
    demo_adapter_folders,
    demo_adapters_root,
)
from contributions.intake import UploadPart
from contributions.models import Adapter, ApiToken

DEMO_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


class Command(BaseCommand):
    help = "Create the demo maintainer and contributor accounts (prints secrets only once)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--reset", action="store_true", help="Issue new passwords and a new demo token."
        )
        parser.add_argument(
            "--adapters",
            action="store_true",
            help="Upload the demo adapters, each as the demo contributor its metadata names "
            "(evaluated as usual).",
        )
        parser.add_argument(
            "--with-control",
            action="store_true",
            help="With --adapters, also upload the shuffled-label control (meant to fail).",
        )

    def handle(
        self,
        *args,
        reset: bool = False,
        adapters: bool = False,
        with_control: bool = False,
        **options,
    ):
        with transaction.atomic():
            self.accounts(reset=reset)
        if adapters:
            self.demo_adapters(with_control=with_control)

    def demo_adapters(self, *, with_control: bool) -> None:
        User = get_user_model()
        demo_contributors = set(DEMO_CONTRIBUTORS)
        for folder in demo_adapter_folders(demo_adapters_root(), with_control=with_control):
            metadata = json.loads((folder / "metadata.json").read_text())
            username = metadata.pop("contributor", None)
            if username not in demo_contributors:
                raise CommandError(
                    f"{folder / 'metadata.json'}: 'contributor' must name one of the demo "
                    f"contributors ({', '.join(sorted(demo_contributors))}), not {username!r}."
                )
            owner = User.objects.get(username=username)
            if Adapter.objects.filter(owner=owner, slug=metadata["slug"]).exists():
                continue
            with transaction.atomic():  # the evaluation is queued when this commits
                adapter = services.adapter_create(owner=owner, **metadata)
                version = services.adapter_version_create(
                    adapter=adapter,
                    actor=owner,
                    parts=[
                        UploadPart(name=file, data=(folder / file).read_bytes())
                        for file in DEMO_FILES
                    ],
                )
            self.stdout.write(f"Uploaded demo adapter {adapter} ({version.status}).")

    def accounts(self, *, reset: bool) -> None:
        User = get_user_model()
        for username, display_name, is_maintainer, api_token in DEMO_USERS:
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
            if api_token:
                ApiToken.objects.filter(user=user, name="demo", revoked_at__isnull=True).delete()
                _, key = services.api_token_create(user=user, name="demo")
                self.stdout.write(self.style.SUCCESS(f"{'':12} API token: {key}"))
        self.stdout.write("These secrets are shown once; save them now.")
