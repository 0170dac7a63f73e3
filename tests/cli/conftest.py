"""Fixtures for the command line's tests: ``cli`` (the command in-process, its output
captured) and a logged-in config, plus the evaluation fixtures (tiny base model, stand-in
child) and the live inference server, from the suites that define them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from contributions import services
from evaluation.tasks import evaluate_run
from tessera_cli.main import main
from tests.evaluation.test_runs import (  # noqa: F401 (fixtures used by name)
    child,
    fast_eval,
    model_cache,
    tiny_base_model,
    tiny_model_source,
)
from tests.routing.conftest import (  # noqa: F401 (fixtures used by name)
    api_redis_db,
    no_evaluation,
    server,
    start_server,
)


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def _nothing_reaches_the_broker(monkeypatch) -> None:
    """Uploads queue their run; unless a test asks for the stand-in worker, nobody runs it
    (the queue is the platform's real one: no other process must get this work)."""
    monkeypatch.setattr(evaluate_run, "apply_async", lambda *args, **kwargs: None)


@pytest.fixture
def config_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "config"
    monkeypatch.setenv("TESSERA_CONFIG_DIR", str(folder))
    for name in ("TESSERA_TOKEN", "TESSERA_URL", "TESSERA_INFERENCE_URL"):
        monkeypatch.delenv(name, raising=False)
    return folder


@pytest.fixture
def cli(capsys, config_dir):
    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def key(contributor) -> str:
    return services.api_token_create(user=contributor, name="cli")[1]


@pytest.fixture
def logged_in(cli, live_server, key) -> str:
    result = cli("login", "--url", live_server.url, "--token", key)
    assert result.code == 0, result.err
    return live_server.url
