"""``tessera train``: the platform's training kit (evaluation.training, as ``manage.py
train_adapter`` runs it) on the contributor's own machine, on the CPU.

The base model comes from the platform (see tessera_cli.basemodel), the task's public split
from ``GET /api/v1/suites/<suite>/public.jsonl`` when the platform has the task, and the
training examples from a local suite-format file (its ``train`` split, else its public one)
or, without one, from that public split. The output folder is what ``tessera push``
uploads: adapter_config.json, adapter_model.safetensors and a README.md model card with the
public split's score before and after.

The kit is imported only when the command runs, so the other commands stay light; it needs
neither Django settings nor a database.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from tessera_cli import basemodel, config
from tessera_cli.api import Platform

# The defaults of ``manage.py train_adapter`` (tests/cli check that they stay the same).
DEFAULTS = {
    "steps": 150,
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.05,
    "lr": 2e-3,
    "batch_size": 16,
    "seed": 0,
    "targets": "q_proj,v_proj,o_proj,up_proj,down_proj",
    "save_dtype": "float16",
    "replay_fraction": 0.25,
}
SAVE_DTYPES = ("float16", "bfloat16", "float32")
# What an output folder may already hold to be written over: an earlier training's adapter.
REWRITABLE = {"adapter_config.json", "adapter_model.safetensors", "README.md", "metadata.json"}


class TrainError(Exception):
    """A problem with the inputs or the training, in words for the user."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--task", required=True, metavar="SLUG", help="task slug (or suite/task)")
    parser.add_argument(
        "--data",
        metavar="FILE.jsonl",
        help="suite-format examples: its train split, else its public one (default: the "
        "task's public split on the platform)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the adapter folder to write")
    parser.add_argument(
        "--steps", metavar="N", type=int, default=d["steps"], help=f"default {d['steps']}"
    )
    parser.add_argument(
        "--rank", metavar="R", type=int, default=d["rank"], help=f"default {d['rank']}"
    )
    parser.add_argument(
        "--alpha", metavar="A", type=float, default=d["alpha"], help=f"default {d['alpha']:g}"
    )
    parser.add_argument(
        "--dropout", metavar="P", type=float, default=d["dropout"], help="default 0.05"
    )
    parser.add_argument(
        "--lr", metavar="LR", type=float, default=d["lr"], help=f"default {d['lr']:g}"
    )
    parser.add_argument(
        "--batch-size", metavar="N", type=int, default=d["batch_size"], help="default 16"
    )
    parser.add_argument("--seed", metavar="N", type=int, default=d["seed"], help="default 0")
    parser.add_argument(
        "--targets", default=d["targets"], help=f"LoRA target modules (default {d['targets']})"
    )
    parser.add_argument("--save-dtype", choices=SAVE_DTYPES, default=d["save_dtype"])
    parser.add_argument(
        "--replay",
        metavar="FILE.jsonl",
        help='everyday prompts ({"prompt": …} a line) whose base-model answers are replayed '
        "during training (default: the kit's evaluation/suites/train/replay.jsonl)",
    )
    parser.add_argument(
        "--replay-fraction",
        metavar="F",
        type=float,
        default=d["replay_fraction"],
        help="part of each batch spent on replay (0 turns replay off; default 0.25)",
    )
    parser.add_argument(
        "--replay-count", metavar="N", type=int, default=0, help="use the first N (0: all)"
    )
    parser.add_argument(
        "--threads", metavar="N", type=int, default=0, help="torch threads (0: torch's)"
    )
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where the base model is kept (default: TESSERA_CACHE_DIR, else the user cache)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_train(args: argparse.Namespace, out: TextIO) -> int:
    try:
        from evaluation import training as kit
        from tessera.errors import DomainError
    except ImportError as exc:  # pragma: no cover - a partial installation
        raise TrainError(
            f"tessera train needs the training kit and its libraries (torch, transformers, "
            f"peft): {exc}"
        ) from exc
    try:
        return _train(args, out, kit)
    except DomainError as exc:  # the kit's own refusals: bad settings, data or replay file
        raise TrainError(f"{exc.message} ({exc.code})") from exc


def _train(args: argparse.Namespace, out: TextIO, kit) -> int:
    say = _printer(out)
    settings = kit.TrainingSettings(
        steps=args.steps,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        save_dtype=args.save_dtype,
        replay_fraction=args.replay_fraction,
    )
    out_dir = Path(args.out)
    _check_out_dir(out_dir)
    data_path = Path(args.data) if args.data else None
    if data_path is not None and not data_path.is_file():
        raise TrainError(f"No such file: {data_path}")
    replay = _replay_prompts(args, kit) if settings.replay_fraction > 0 else []

    cfg = config.load()
    with Platform(cfg.url, cfg.token) as platform:
        data = None
        if data_path is not None:
            data = kit.training_data_from_jsonl(
                data_path.read_bytes(),
                task_slug=args.task.rpartition("/")[2],
                source=str(data_path),
            )
        if data is None or not data.public_examples:
            data = _with_public_split(platform, data, args.task, say, kit)
        if replay:
            data = replace(data, replay_prompts=replay)

        manifest = basemodel.parse_manifest(platform.base_model())
        cache_root = Path(args.cache_dir) if args.cache_dir else config.cache_dir()
        copy = basemodel.fetch(
            platform, manifest, cache_root.expanduser(), progress=not args.no_progress, out=out
        )

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    say(f"Loading the base model {manifest.name} …")
    model, tokenizer = basemodel.load(copy.folder)
    result = kit.run_training(
        model=model,
        tokenizer=tokenizer,
        data=data,
        settings=settings,
        out_dir=out_dir,
        base_model_name=manifest.adapter_base_model_name,
        command_line=_command_line(args),
        show_progress=not args.no_progress,
        log=say,
        replay_cache_dir=cache_root.expanduser() / "replay-cache",
        replay_cache_key=manifest.weights_sha256,
    )
    say(f"Adapter in {result.out_dir} ({result.steps} steps, {result.seconds / 60:.1f} min).")
    if result.adapter_public_score is not None:
        say(
            f"Public split of {data.task_slug} ({result.public_examples} examples, "
            f"{data.metric}): base {result.base_public_score:.3f}, "
            f"with the adapter {result.adapter_public_score:.3f}."
        )
    say(
        "Next: add a metadata.json (slug, title, license, intended_use, "
        f"training_data_summary, example_prompts) and run `tessera push {out_dir}`."
    )
    return 0


def _printer(out: TextIO):
    def say(message: str) -> None:
        print(message, file=out, flush=True)

    return say


def _check_out_dir(out_dir: Path) -> None:
    """Refuse a folder holding anything but an earlier adapter: training writes README.md
    and the adapter files there, and must not write over someone's project."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TrainError(f"{out_dir} exists and is not a folder.")
    if out_dir.is_dir():
        others = sorted(p.name for p in out_dir.iterdir() if p.name not in REWRITABLE)
        if others:
            raise TrainError(
                f"{out_dir} holds other files ({', '.join(others[:5])}); give --out a new or "
                "an adapter's folder."
            )


def _replay_prompts(args: argparse.Namespace, kit) -> list[str]:
    if args.replay:
        path = Path(args.replay)
        if not path.is_file():
            raise TrainError(f"No such replay file: {path}")
    else:
        path = Path(kit.__file__).resolve().parent / "suites" / "train" / "replay.jsonl"
        if not path.is_file():
            raise TrainError(
                "This installation has no built-in replay prompts; pass --replay FILE or "
                "--replay-fraction 0."
            )
    return kit.replay_prompts_from_jsonl(path.read_bytes(), limit=args.replay_count or None)


def _with_public_split(platform: Platform, data, task: str, say, kit):
    """``data`` with the platform's public split of the task to score (as train_adapter
    does when its file has none); without ``data``, that split to train on as well."""
    suite_slug, _, task_slug = task.rpartition("/")
    found = _platform_task(platform, suite_slug, task_slug, required=data is None)
    if found is None or not found[1]["counts"]["public"]:
        what = "no current task" if found is None else "no public examples for the task"
        say(f"The platform has {what} {task!r}: the public split is not scored.")
        return data
    suite, spec = found
    public = kit.training_data_from_jsonl(
        platform.get_bytes(f"suites/{suite['suite']}/public.jsonl"),
        task_slug=task_slug,
        source=f"the public split of suite {suite['suite']} v{suite['version']}",
    )
    if data is None:
        # As train_adapter without --jsonl: train on the public split, and score on it.
        return replace(public, public_examples=public.examples)
    if data.prompt_template != spec["prompt_template"]:
        say(
            f"Note: {data.source} renders {task_slug} with another prompt template than the "
            "platform's; the platform evaluates with its own."
        )
    return replace(data, public_examples=public.examples)


def _platform_task(
    platform: Platform, suite_slug: str, task_slug: str, *, required: bool
) -> tuple[dict, dict] | None:
    """(suite version, task) of the current task called ``task_slug`` (in ``suite_slug``
    when given), from the public suite listing; None when there is none and none is
    ``required``."""
    found = [
        (suite, task)
        for suite in platform.suites()
        if not suite_slug or suite["suite"] == suite_slug
        for task in suite["tasks"]
        if task["slug"] == task_slug
    ]
    name = f"{suite_slug}/{task_slug}" if suite_slug else task_slug
    if len(found) > 1:
        names = ", ".join(f"{suite['suite']}/{task['slug']}" for suite, task in found)
        raise TrainError(f"{name!r} names more than one task ({names}); say which suite.")
    if not found:
        if required:
            raise TrainError(
                f"The platform has no current task {name!r} to train on; pass --data FILE.jsonl "
                "with examples of it."
            )
        return None
    if found[0][1]["counts"]["public"] == 0 and required:
        raise TrainError(f"Task {name!r} has no public examples to train on; pass --data.")
    return found[0]


def _command_line(args: argparse.Namespace) -> str:
    """The command that repeats this training, every setting spelled out (for the card)."""
    parts = ["tessera", "train", "--task", args.task]
    if args.data:
        parts += ["--data", str(args.data)]
    parts += ["--out", str(args.out)]
    for key in ("steps", "rank", "alpha", "dropout", "lr", "batch_size", "seed", "targets"):
        parts += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    parts += ["--save-dtype", args.save_dtype, "--replay-fraction", str(args.replay_fraction)]
    if args.replay:
        parts += ["--replay", str(args.replay)]
    if args.replay_count:
        parts += ["--replay-count", str(args.replay_count)]
    return shlex.join(parts)
