"""Train a LoRA adapter for the active base model on one task.

    python manage.py train_adapter --task addition --out demo/adapters/addition \
        [--jsonl evaluation/suites/train/addition.jsonl] [--steps 150] [--rank 8] \
        [--alpha 16] [--lr 0.002] [--batch-size 16] [--shuffle-labels] [--seed 0] \
        [--targets q_proj,v_proj,o_proj,up_proj,down_proj] [--replay-fraction 0.25]

Without --jsonl it trains on the task's PUBLIC examples in the current suite version (the
hidden ones are never used). With --jsonl it trains on that file's ``train`` split (or its
public split), in the suite format. Either way the public split of the current suite version,
when there is one, is scored before and after and written into the model card.
"""

from __future__ import annotations

import sys
from pathlib import Path

from django.conf import settings as django_settings
from django.core.management.base import BaseCommand, CommandError

from contributions.base_models import base_model_load
from contributions.selectors import base_model_active
from evaluation import suites_selectors
from evaluation.models import Example
from evaluation.training import (
    DEFAULT_BASE_MODEL_NAME,
    DEFAULT_TARGETS,
    SAVE_DTYPES,
    TrainingData,
    TrainingSettings,
    command_line_of,
    replay_prompts_from_jsonl,
    run_training,
    training_data_from_jsonl,
)
from tessera.errors import DomainError

REPLAY_FILE = Path(__file__).resolve().parents[2] / "suites" / "train" / "replay.jsonl"


class Command(BaseCommand):
    help = "Train a PEFT LoRA adapter for the active base model on one task's examples."

    def add_arguments(self, parser):
        parser.add_argument("--task", required=True, help="task slug (or suite/task)")
        parser.add_argument("--out", required=True, type=Path, help="output folder")
        parser.add_argument("--jsonl", type=Path, help="train on this suite-format file")
        parser.add_argument("--steps", type=int, default=150)
        parser.add_argument("--rank", type=int, default=8)
        parser.add_argument("--alpha", type=float, default=16.0)
        parser.add_argument("--dropout", type=float, default=0.05)
        parser.add_argument("--lr", type=float, default=2e-3)
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--shuffle-labels", action="store_true", help="permute targets")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
        parser.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float16")
        parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
        parser.add_argument(
            "--base-model-name",
            default="",
            help="base_model_name_or_path to write (default: the hub name of the active "
            f"base model, e.g. {DEFAULT_BASE_MODEL_NAME})",
        )
        parser.add_argument(
            "--replay",
            type=Path,
            default=REPLAY_FILE,
            help="everyday prompts whose base-model answers are replayed during training "
            f"(default {REPLAY_FILE.relative_to(REPLAY_FILE.parents[3])})",
        )
        parser.add_argument(
            "--replay-fraction",
            type=float,
            default=0.25,
            help="part of each batch spent on replay (0 turns replay off; default 0.25)",
        )
        parser.add_argument("--replay-count", type=int, default=0, help="use the first N (0: all)")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args, **options):
        try:
            self._handle(options)
        except DomainError as exc:
            raise CommandError(f"{exc.message} [{exc.code}]") from exc

    def _handle(self, options) -> None:
        import torch

        if options["threads"]:
            torch.set_num_threads(options["threads"])
        settings = TrainingSettings(
            steps=options["steps"],
            rank=options["rank"],
            alpha=options["alpha"],
            dropout=options["dropout"],
            lr=options["lr"],
            batch_size=options["batch_size"],
            shuffle_labels=options["shuffle_labels"],
            seed=options["seed"],
            targets=tuple(t.strip() for t in options["targets"].split(",") if t.strip()),
            save_dtype=options["save_dtype"],
            replay_fraction=options["replay_fraction"],
        )
        data = self._data(options["task"], options["jsonl"])
        if settings.replay_fraction > 0:
            if not options["replay"].is_file():
                raise CommandError(f"No such replay file: {options['replay']}")
            prompts = replay_prompts_from_jsonl(
                options["replay"].read_bytes(), limit=options["replay_count"] or None
            )
            data = TrainingData(**{**data.__dict__, "replay_prompts": prompts})
        base_model = base_model_active()
        name = options["base_model_name"] or _hub_name(base_model)
        self.stdout.write(f"Loading the base model {base_model.name} …")
        model, tokenizer = base_model_load(base_model)
        argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "train_adapter" else []
        result = run_training(
            model=model,
            tokenizer=tokenizer,
            data=data,
            settings=settings,
            out_dir=options["out"],
            base_model_name=name,
            command_line=command_line_of(argv) if argv else _command_line(options),
            show_progress=not options["no_progress"],
            log=lambda message: self.stdout.write(message),
            replay_cache_dir=Path(django_settings.VAR_DIR) / "replay-cache",
            replay_cache_key=base_model.weights_sha256,
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"Adapter in {result.out_dir} ({result.steps} steps, "
                f"{result.seconds / 60:.1f} min)."
            )
        )

    def _data(self, task_slug: str, jsonl: Path | None) -> TrainingData:
        task = None
        try:
            task = suites_selectors.task_current(slug=task_slug)
        except DomainError:
            if jsonl is None:
                raise
        if jsonl is not None:
            if not jsonl.is_file():
                raise CommandError(f"No such file: {jsonl}")
            data = training_data_from_jsonl(
                jsonl.read_bytes(), task_slug=task_slug.rpartition("/")[2], source=str(jsonl)
            )
            if task is not None and not data.public_examples:
                public = suites_selectors.task_examples(task=task, split=Example.Split.PUBLIC)
                data = TrainingData(**{**data.__dict__, "public_examples": public})
            return data
        public = suites_selectors.task_examples(task=task, split=Example.Split.PUBLIC)
        if not public:
            raise CommandError(f"Task {task_slug!r} has no public examples to train on.")
        version = task.suite_version
        return TrainingData(
            task_slug=task.slug,
            task_title=task.title,
            tags=list(task.tags),
            metric=task.metric,
            prompt_template=task.prompt_template,
            max_new_tokens=task.max_new_tokens,
            examples=public,
            source=f"the public split of suite {version.suite.slug} v{version.number}",
            public_examples=public,
        )


def _hub_name(base_model) -> str:
    if DEFAULT_BASE_MODEL_NAME in base_model.aliases:
        return DEFAULT_BASE_MODEL_NAME
    with_org = [alias for alias in base_model.aliases if "/" in alias and not alias.startswith("/")]
    return with_org[0] if with_org else base_model.name


def _command_line(options) -> str:
    parts = ["python", "manage.py", "train_adapter", "--task", options["task"]]
    parts += ["--out", str(options["out"])]
    if options["jsonl"]:
        parts += ["--jsonl", str(options["jsonl"])]
    keys = ("steps", "rank", "alpha", "lr", "batch_size", "seed", "targets", "save_dtype")
    for key in (*keys, "replay_fraction"):
        parts += [f"--{key.replace('_', '-')}", str(options[key])]
    if options["shuffle_labels"]:
        parts.append("--shuffle-labels")
    return " ".join(parts)
