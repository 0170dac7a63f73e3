"""The ``tessera`` command: login, push, status, withdraw, import-hub, ask and train.

Exit codes: 0 done (for push and import-hub: the version passed or was admitted), 1 the
version failed evaluation (or was rejected), 2 a usage error, a refusal by an API (its own
message is shown), an unreachable server or a training that could not run.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tessera_cli import basemodel, config, follow, intake, train
from tessera_cli.api import ApiError, Inference, Platform, platform_base

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
DEFAULT_URL = "http://127.0.0.1:8000"
COMPOSITIONS = ("top1", "topk", "arrow", "logit", "merged")


class UsageError(Exception):
    pass


# --- login --------------------------------------------------------------------------------


def cmd_login(args: argparse.Namespace, out: TextIO) -> int:
    stored = config.load_stored()
    url = platform_base(
        args.url or os.environ.get("TESSERA_URL") or stored.get("url") or DEFAULT_URL
    )
    token = args.token or os.environ.get("TESSERA_TOKEN")
    if not token:
        if not sys.stdin.isatty():
            raise UsageError("No token: pass --token, set TESSERA_TOKEN, or run in a terminal.")
        token = getpass.getpass(f"API token for {url} (from its API tokens page): ").strip()
    if not token:
        raise UsageError("No token given.")
    # The REST API does not publish where the inference server is (the portal's tokens page
    # shows it): take the flag, the environment, an earlier login, or the standard port.
    inference_url = (
        args.inference_url
        or os.environ.get("TESSERA_INFERENCE_URL")
        or (stored.get("inference_url") if stored.get("url") == url else None)
        or config.default_inference_url(url)
    ).rstrip("/")
    with Platform(url, token) as platform:
        me = platform.me()  # refuses a wrong or revoked token with the API's own message
    path = config.save(config.Config(url=url, inference_url=inference_url, token=token))
    print(f"Logged in to {url} as {me['username']}.", file=out)
    print(f"Inference API: {inference_url}", file=out)
    print(f"Saved to {path} (readable by you only).", file=out)
    return EXIT_OK


# --- push and import-hub --------------------------------------------------------------------


def _push(
    args: argparse.Namespace, folder: Path, metadata: dict, defaults: dict, out: TextIO
) -> int:
    fields = {
        **defaults,
        **intake.adapter_fields(
            metadata,
            slug=args.slug,
            title=args.title,
            license=args.license,
            tags=args.tags,
            private=args.private,
        ),
    }
    files = intake.adapter_files(folder)
    cfg = config.load()
    with Platform(cfg.url, cfg.token) as platform:
        me = platform.me()
        adapter = platform.own_adapter(me["username"], fields["slug"])
        created = adapter is None
        if created:
            adapter = platform.post("adapters/", fields)
            print(f"Created adapter {fields['slug']} (id {adapter['id']}).", file=out)
        try:
            version = platform.upload(adapter["id"], files)
        except ApiError:
            if created:
                print(
                    f"The adapter {fields['slug']} exists now, with no version: push again "
                    "once the files are fixed to add one.",
                    file=sys.stderr,
                )
            raise
        sent = ", ".join(name for name, _ in files)
        print(
            f"Uploaded {fields['slug']} v{version['number']} ({sent}): {version['status']}.",
            file=out,
        )
        if args.no_wait:
            return EXIT_OK
        outcome = follow.follow(
            platform,
            adapter["id"],
            version["number"],
            interval=args.poll_interval,
            timeout=args.timeout,
        )
    follow.describe(outcome, out)
    return EXIT_OK if outcome.passed else EXIT_FAILED


def cmd_push(args: argparse.Namespace, out: TextIO) -> int:
    folder = Path(args.folder)
    metadata_path = Path(args.metadata) if args.metadata else folder / intake.METADATA_NAME
    if args.metadata and not metadata_path.is_file():
        raise UsageError(f"No metadata file at {metadata_path}.")
    metadata = intake.read_metadata(metadata_path)
    defaults = {"slug": intake.slug_from(folder.resolve().name)}
    return _push(args, folder, metadata, defaults, out)


def cmd_import_hub(args: argparse.Namespace, out: TextIO) -> int:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snapshot = snapshot_download(
            args.repo_id,
            revision=args.revision,
            allow_patterns=list(intake.ADAPTER_FILES),
            cache_dir=args.cache_dir,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError) as exc:
        raise UsageError(f"Cannot fetch {args.repo_id} from the Hub: {exc}") from exc
    folder = Path(snapshot)
    commit = folder.name  # the cache keeps each snapshot under its commit hash
    print(f"Fetched {args.repo_id}@{commit[:12]} into {folder}.", file=out)
    metadata = intake.read_metadata(Path(args.metadata)) if args.metadata else {}
    defaults = {
        "slug": intake.slug_from(args.repo_id.rsplit("/", 1)[-1]),
        "title": args.repo_id,
        "description": f"Imported from the Hugging Face Hub: {args.repo_id} at commit {commit}.",
    }
    return _push(args, folder, metadata, defaults, out)


# --- status and withdraw --------------------------------------------------------------------


def _own_adapter(platform: Platform, slug: str) -> dict:
    me = platform.me()
    adapter = platform.own_adapter(me["username"], slug)
    if adapter is None:
        raise UsageError(f"You have no adapter {slug!r}.")
    return adapter


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    cfg = config.load()
    with Platform(cfg.url, cfg.token) as platform:
        if args.slug:
            adapter = _own_adapter(platform, args.slug)
            print(f"{adapter['slug']}: {adapter['title']} ({adapter['visibility']})", file=out)
            if not adapter["versions"]:
                print("  no versions yet", file=out)
            for version in adapter["versions"]:
                print(
                    f"  v{version['number']:<3} {version['status']:<11} "
                    f"r={version['rank']} {version['dtype']} {version['size_bytes']:,} bytes, "
                    f"uploaded {version['created_at'][:19].replace('T', ' ')}",
                    file=out,
                )
            return EXIT_OK
        me = platform.me()
        mine = [a for a in platform.adapters() if a["owner"] == me["username"]]
        if not mine:
            print("You have no adapters yet: `tessera push FOLDER` uploads one.", file=out)
            return EXIT_OK
        width = max(len(a["slug"]) for a in mine)
        for summary in mine:
            adapter = platform.get(f"adapters/{summary['id']}/")
            versions = adapter["versions"]  # newest first
            latest = (
                f"v{versions[0]['number']} {versions[0]['status']}" if versions else "no versions"
            )
            print(f"{adapter['slug']:<{width}}  {latest:<16} {adapter['title']}", file=out)
    return EXIT_OK


def cmd_withdraw(args: argparse.Namespace, out: TextIO) -> int:
    cfg = config.load()
    with Platform(cfg.url, cfg.token) as platform:
        adapter = _own_adapter(platform, args.slug)
        numbers = [v["number"] for v in adapter["versions"]]
        if not numbers:
            raise UsageError(f"{args.slug} has no versions to withdraw.")
        number = args.version if args.version is not None else max(numbers)
        version = platform.post(
            f"adapters/{adapter['id']}/versions/{number}/withdraw/", {"reason": args.reason}
        )
    print(f"Withdrew {args.slug} v{version['number']}: {version['status']}.", file=out)
    return EXIT_OK


# --- ask --------------------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace, out: TextIO) -> int:
    cfg = config.load()
    extension: dict = {}
    if args.composition:
        extension["composition"] = args.composition
    if args.k is not None:
        extension["k"] = args.k
    body: dict = {"model": args.model, "messages": [{"role": "user", "content": args.prompt}]}
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if extension:
        body["tessera"] = extension
    attribution = None
    with Inference(args.inference_url or cfg.inference_url, cfg.token) as inference:
        for chunk in inference.stream_chat(body):
            # The first chunk carries the composition's weights; the final one the weights
            # the answer was made with: the last one seen is the one to report.
            attribution = chunk.get("tessera") or attribution
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    out.write(text)
                    out.flush()
    out.write("\n")
    print(answered_by(attribution), file=out)
    return EXIT_OK


def answered_by(attribution: dict | None) -> str:
    if attribution is None:
        return "Answered by: (no attribution in the response)"
    adapters = attribution.get("adapters") or []
    if not adapters:
        return "Answered by: the base model alone (no adapter)"
    parts = ", ".join(f"{a['id']} (weight {a['weight']:g})" for a in adapters)
    method = (attribution.get("composition") or {}).get("method")
    return f"Answered by: {parts}" + (f" [{method}]" if method else "")


# --- The parser ---------------------------------------------------------------------------------


def _intake_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slug", help="the adapter's slug (default: metadata, else the name)")
    parser.add_argument("--title", help="the adapter's title (over metadata.json's)")
    parser.add_argument("--license", help="an SPDX id the platform lists, e.g. Apache-2.0")
    parser.add_argument("--tags", help="task tags, comma-separated (over metadata.json's)")
    parser.add_argument(
        "--private", action="store_true", help="a new adapter serves only your own keys"
    )
    parser.add_argument(
        "--metadata", metavar="FILE", help="adapter metadata JSON (push: FOLDER/metadata.json)"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="return after the upload, not the evaluation"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="seconds between progress polls (default 2)",
    )
    parser.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="give up waiting after this long"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Upload LoRA adapters to a Tessera platform, follow their evaluation, "
        "ask the served mixture, and train an adapter locally.",
        epilog="Exit codes: 0 done or passed, 1 the version failed evaluation, 2 an error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    login = commands.add_parser("login", help="store the platform URL and an API token")
    login.add_argument("--url", help=f"the platform (default: TESSERA_URL, else {DEFAULT_URL})")
    login.add_argument("--token", help="an API token (default: TESSERA_TOKEN, else a prompt)")
    login.add_argument(
        "--inference-url",
        help="the inference API, e.g. http://host:8001/v1 (as the portal's tokens page shows)",
    )
    login.set_defaults(handler=cmd_login)

    push = commands.add_parser(
        "push", help="upload an adapter folder as a new adapter or a new version"
    )
    push.add_argument(
        "folder",
        metavar="FOLDER",
        help="adapter_config.json, adapter_model.safetensors, README.md and metadata.json",
    )
    _intake_flags(push)
    push.set_defaults(handler=cmd_push)

    status = commands.add_parser("status", help="your adapters, or one adapter's versions")
    status.add_argument("slug", nargs="?", metavar="SLUG")
    status.set_defaults(handler=cmd_status)

    withdraw = commands.add_parser("withdraw", help="withdraw a version (default: the latest)")
    withdraw.add_argument("slug", metavar="SLUG")
    withdraw.add_argument("--version", type=int, metavar="N")
    withdraw.add_argument("--reason", default="", help="recorded in the audit trail")
    withdraw.set_defaults(handler=cmd_withdraw)

    hub = commands.add_parser(
        "import-hub", help="fetch a PEFT adapter repo from the Hugging Face Hub and push it"
    )
    hub.add_argument("repo_id", metavar="REPO_ID")
    hub.add_argument("--revision", help="a branch, tag or commit (default: main)")
    hub.add_argument("--cache-dir", help="huggingface_hub's cache (default: its own, HF_HUB_CACHE)")
    _intake_flags(hub)
    hub.set_defaults(handler=cmd_import_hub)

    ask = commands.add_parser("ask", help="one chat completion from the inference API, streamed")
    ask.add_argument("prompt", metavar="PROMPT")
    ask.add_argument("--model", default="tessera", help="tessera, base, or owner/adapter")
    ask.add_argument("--composition", choices=COMPOSITIONS)
    ask.add_argument("--k", type=int, help="how many adapters topk, arrow and logit combine")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--inference-url", help="over the one stored at login")
    ask.set_defaults(handler=cmd_ask)

    trainer = commands.add_parser(
        "train",
        help="train a LoRA adapter for the platform's base model on this machine's CPU",
        description="Fetch the platform's base model (once; it is cached), train a LoRA "
        "adapter on a task's examples as `manage.py train_adapter` does, score the task's "
        "public split before and after, and write the folder `tessera push` uploads.",
    )
    train.add_arguments(trainer)
    trainer.set_defaults(handler=train.cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): returned, not raised
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    # httpx logs every request at INFO; what the user sees is this command's own output.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = sys.stdout
    try:
        return args.handler(args, out)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        fields = exc.details.get("fields") if isinstance(exc.details, dict) else None
        if isinstance(fields, dict) and len(fields) > 1:
            for name, problems in fields.items():
                print(f"  {name}: {_first(problems)}", file=sys.stderr)
        return EXIT_ERROR
    except (
        UsageError,
        config.NotLoggedIn,
        intake.IntakeError,
        TimeoutError,
        train.TrainError,
        basemodel.BaseModelError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if args.command == "train":
            print("interrupted: the training stopped", file=sys.stderr)
            return 130
        # Only the waiting stops: an uploaded version's evaluation goes on on the platform.
        print("interrupted (`tessera status SLUG` shows where things stand)", file=sys.stderr)
        return 130


def _first(problems) -> str:
    if isinstance(problems, list) and problems:
        return _first(problems[0])
    if isinstance(problems, dict) and problems:
        key, value = next(iter(problems.items()))
        return f"{key}: {_first(value)}"
    return str(problems)
