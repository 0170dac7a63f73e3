"""Build a mixture version's merged adapter now, in this process, and print what came out.

    python manage.py merge_mixture                      # the active mixture
    python manage.py merge_mixture --mixture 3 --method dare_ties --density 0.3

The same build as the job queued when a mixture is published (routing.merging): the
mixture's public members merged with PEFT on the active base model. A previous build of
that mixture, and its files, is replaced; a running server picks the new one up at its
next poll.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from routing.merging.merge import METHODS
from routing.merging.services import merge_compute_now
from routing.models import MergedAdapter
from routing.selectors import mixture_by_number_or_active


class Command(BaseCommand):
    help = "Merge a mixture version's public adapters into one LoRA (model tessera-merged)."

    def add_arguments(self, parser):
        parser.add_argument("--mixture", type=int, help="mixture version number (default: active)")
        parser.add_argument("--method", choices=METHODS, help="default: TESSERA_MERGE_METHOD")
        parser.add_argument("--density", type=float, help="default: TESSERA_MERGE_DENSITY")

    def handle(self, *args, mixture=None, method=None, density=None, **options):
        found = mixture_by_number_or_active(mixture)
        if found is None:
            raise CommandError("No such mixture version (none is published yet?).")
        if density is not None and not 0 < density <= 1:
            raise CommandError("--density must be in (0, 1].")
        merged = merge_compute_now(mixture=found, method=method, density=density)
        if merged.status != MergedAdapter.Status.DONE:
            raise CommandError(f"Merging failed: {merged.reason}")
        if not merged.weights_file:
            self.stdout.write(f"Mixture v{found.number}: nothing merged. {merged.reason}")
            return
        self.stdout.write(
            f"Mixture v{found.number}: {len(merged.version_ids)} adapters merged with "
            f"{merged.method} (density {merged.density:g}) into rank {merged.rank} on "
            f"{', '.join(merged.adapter_config['target_modules'])}: {merged.weights_file.name}"
        )
