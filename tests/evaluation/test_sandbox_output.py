"""What a child writes reaches the contributor only cleaned: the log, progress labels, the
result's strings and the failure reason carry no terminal escape sequences, no control
characters and no host paths, and the log is bounded."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from evaluation.models import EvaluationRun
from evaluation.worker.sandbox import (
    LOG_CAP_BYTES,
    PROJECT_ROOT,
    SandboxLimits,
    clean_text,
    host_paths,
    run_sandboxed,
    sandbox_mode,
    workdir_create,
    workdir_remove,
)
from tests.evaluation.test_runs import execute, fresh, make_task, queued_version

# Each a way to make a terminal (or a log viewer) show what is not there.
HOSTILE = (
    "\x1b[31mred\x1b[0m"  # a colour
    "\x1b]0;a new title\x07"  # the window title
    "\x1b]8;;https://example.invalid/\x1b\\link\x1b]8;;\x1b\\"  # a hyperlink
    "\x1b[2J\x1b[H"  # clear the screen, cursor home
    "\x07\x00\x08"  # bell, NUL, backspace
    "over\rwritten"  # a carriage return over a line
    "\u202eevil\u202c"  # right-to-left override
)


def _assert_clean(text: str) -> None:
    for char in ("\x1b", "\x07", "\x00", "\x08", "\r", "\u202e", "\u202c", "\x9b"):
        assert char not in text, repr(char)


def test_escape_sequences_and_control_characters_are_removed_and_the_words_kept():
    cleaned = clean_text(HOSTILE + "\n\tindented")
    _assert_clean(cleaned)
    assert cleaned == "redlinkover\nwrittenevil\n\tindented"


def test_host_paths_read_as_what_they_are():
    hide = host_paths(workdir="/tmp/tessera-run-7-abc", inputs=["/srv/models/smollm2"])
    text = clean_text(
        f"/tmp/tessera-run-7-abc/adapter/x loaded; {PROJECT_ROOT}/.env; {sys.prefix}/lib; "
        "/srv/models/smollm2/config.json; /tmpfoo stays",
        hide=hide,
    )
    assert text == (
        "<workdir>/adapter/x loaded; <project>/.env; <venv>/lib; <input>/config.json; /tmpfoo stays"
    )


@pytest.fixture
def workdir():
    path, _adapter_dir = workdir_create(files={"adapter_model.safetensors": b"w"})
    yield path
    workdir_remove(path)


def limits() -> SandboxLimits:
    return SandboxLimits(
        memory_bytes=4 * 1024**3,
        cpu_seconds=60,
        open_files=256,
        file_bytes=16 * 1024**2,
        wall_seconds=30.0,
    )


def test_the_log_labels_and_result_strings_come_back_cleaned(workdir):
    code = textwrap.dedent(
        f"""
        import json, os, sys
        hostile = {HOSTILE!r}
        sys.stderr.write(hostile + " in " + os.getcwd() + " with " + sys.prefix + "\\n")
        print(json.dumps({{"progress": 0, "total": 1, "label": hostile}}), flush=True)
        print(json.dumps({{"result": {{"failed": {{"run:1": hostile + os.getcwd()}}}}}}))
        """
    )
    labels = []
    outcome = run_sandboxed(
        [sys.executable, "-c", code],
        stdin_bytes=b"",
        limits=limits(),
        workdir=workdir,
        mode=sandbox_mode(),
        on_progress=lambda done, total, label: labels.append(label),
    )
    assert outcome.failure() is None, outcome.log
    for text in (outcome.log, labels[0], outcome.result["failed"]["run:1"]):
        _assert_clean(text)
        assert str(workdir) not in text and sys.prefix not in text
    assert outcome.log.startswith("redlinkover\nwrittenevil in <workdir> with <venv>")
    assert outcome.result["failed"]["run:1"].endswith("evil<workdir>")


def test_a_crash_message_is_the_cleaned_last_line_of_the_log(workdir):
    code = f"raise SystemExit({HOSTILE!r} + ' at ' + {str(PROJECT_ROOT / '.env')!r})"
    outcome = run_sandboxed(
        [sys.executable, "-c", code],
        stdin_bytes=b"",
        limits=limits(),
        workdir=workdir,
        mode=sandbox_mode(),
    )
    code, reason = outcome.failure()
    assert code == "sandbox_crashed"
    _assert_clean(reason)
    assert reason == "The evaluation exited with status 1: writtenevil at <project>/.env"


def test_invalid_output_is_named_without_its_escapes_or_paths(workdir):
    code = f"print({HOSTILE!r} + {str(PROJECT_ROOT)!r}, flush=True)"
    outcome = run_sandboxed(
        [sys.executable, "-c", code],
        stdin_bytes=b"",
        limits=limits(),
        workdir=workdir,
        mode=sandbox_mode(),
    )
    code, reason = outcome.failure()
    assert code == "sandbox_bad_output"
    assert "\\x1b" in reason  # shown escaped, so it is harmless text
    _assert_clean(reason)
    assert str(PROJECT_ROOT) not in reason and "<project>" in reason


def test_a_runs_stored_log_and_reason_are_bounded_and_cleaned(
    contributor, tiny_base_model, child, fast_eval
):
    """End to end: the contributor's run page and API show run.log and failure_reason."""
    make_task()
    code = textwrap.dedent(
        f"""
        import os, sys
        sys.stdin.read()
        hostile = {HOSTILE!r}
        for _ in range(4000):
            sys.stderr.write(hostile * 4 + os.getcwd() + "\\n")
        sys.exit(hostile + " in " + os.getcwd())
        """
    )
    child([sys.executable, "-c", code])
    _version, run = queued_version(contributor)
    assert execute(run) == "failed"
    run = fresh(run)
    assert (run.status, run.failure_code) == (EvaluationRun.Status.FAILED, "sandbox_crashed")
    assert run.failure_reason == "The evaluation exited with status 1: writtenevil in <workdir>"
    assert len(run.log.encode()) <= LOG_CAP_BYTES + 200
    assert "earlier bytes of the log dropped" in run.log
    _assert_clean(run.log)
    assert "/tmp/" not in run.log and "<workdir>" in run.log
    assert json.dumps(run.log)  # plain text


@pytest.mark.parametrize("depth", [40, 100_000])
def test_a_result_nested_too_deep_is_bad_output_not_a_crash_of_the_worker(depth, workdir):
    code = f"print('{{\"result\": ' + '[' * {depth} + ']' * {depth} + '}}', flush=True)"
    outcome = run_sandboxed(
        [sys.executable, "-c", code],
        stdin_bytes=b"",
        limits=limits(),
        workdir=workdir,
        mode=sandbox_mode(),
    )
    code, reason = outcome.failure()
    assert code == "sandbox_bad_output"
    assert "not JSON" in reason or "nested over 32 levels" in reason
    assert outcome.result is None
