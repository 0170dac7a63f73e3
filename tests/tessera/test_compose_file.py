"""docker-compose.yml and platform/Dockerfile: the compose file validates with Debian's
docker-compose (platform/ensure-test-services.sh installs it; `config` needs no Docker
engine), refuses to start without its secrets, names every process the deployment needs
with a health check, puts the GPU services under the ``gpu`` profile with an NVIDIA
reservation and a CUDA build of torch, has every Celery queue consumed exactly once, and
gives settings that load; the image copies every package the project installs."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "platform" / "Dockerfile"
SECRETS = {"DJANGO_SECRET_KEY": "k" * 64, "TESSERA_SUITE_SEED": "s" * 32}
ONE_SHOT = {"minio-bucket", "migrate"}
QUEUES = {"default", "maintenance", "eval-cpu", "eval-gpu"}


def compose_env(**values: str) -> dict[str, str]:
    """Only what compose needs: none of the suite's DATABASE_URL, DJANGO_* or TESSERA_*,
    which the file would take as the operator's overrides."""
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    env.update(values)
    return env


def docker_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is missing: run platform/ensure-test-services.sh (as root)"
    return subprocess.run(
        [binary, "-f", str(COMPOSE), "--project-directory", str(ROOT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def config() -> dict:
    """The file as docker-compose resolves it (anchors merged, defaults interpolated)."""
    result = docker_compose("--profile", "gpu", "config", env=compose_env(**SECRETS))
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def option(words: list[str], *names: str) -> str | None:
    for index, word in enumerate(words):
        for name in names:
            if word == name and index + 1 < len(words):
                return words[index + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def test_validates_quietly():
    result = docker_compose("config", "-q", env=compose_env(**SECRETS))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("secret", sorted(SECRETS))
def test_refuses_to_start_without_its_secrets(secret):
    others = {key: value for key, value in SECRETS.items() if key != secret}
    result = docker_compose("config", "-q", env=compose_env(**others))
    assert result.returncode != 0
    assert f"set {secret}" in result.stderr


def test_every_process_is_there(config):
    assert set(config["services"]) >= {
        "postgres",
        "redis",
        "minio",
        "minio-bucket",
        "migrate",
        "web",
        "inference",
        "inference-gpu",
        "worker",
        "beat",
        "worker-eval-cpu",
        "worker-eval-gpu",
    }
    web = argv(config["services"]["web"]["command"])
    assert web[0] == "gunicorn"
    for name in ("inference", "inference-gpu"):
        assert argv(config["services"][name]["command"])[:2] == [
            "uvicorn",
            "tessera.serving:application",
        ]
    # The bucket exists before anything that stores files starts.
    migrate = config["services"]["migrate"]
    assert migrate["depends_on"]["minio-bucket"]["condition"] == "service_completed_successfully"
    assert "mc mb" in " ".join(argv(config["services"]["minio-bucket"]["command"]))


def test_gpu_services_are_under_the_gpu_profile_with_an_nvidia_reservation(config):
    services = config["services"]
    gpu = {name for name, service in services.items() if "gpu" in service.get("profiles", [])}
    assert gpu == {"inference-gpu", "worker-eval-gpu"}
    for name, service in services.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        devices = devices.get("devices", [])
        if name in gpu:
            assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
            assert "cu" in service["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[1], name
            assert service["image"] != services["web"]["image"], name
        else:
            assert devices == [], name
    assert services["inference-gpu"]["environment"]["TESSERA_SERVING_DEVICE"] == "cuda"
    assert services["inference"]["environment"]["TESSERA_SERVING_DEVICE"] == "cpu"
    # CUDA maps far more address space than it uses: the GPU worker's child has no RLIMIT_AS.
    assert services["worker-eval-gpu"]["environment"]["TESSERA_SANDBOX_MEMORY_BYTES"] == "0"


def test_cpu_and_cuda_torch_indexes(config):
    services = config["services"]
    cpu = services["web"]["build"]["args"]["TORCH_INDEX_URL"]
    cuda = services["inference-gpu"]["build"]["args"]["TORCH_INDEX_URL"]
    assert cpu == "https://download.pytorch.org/whl/cpu"
    assert cuda.startswith("https://download.pytorch.org/whl/cu")
    assert cuda.removeprefix("https://download.pytorch.org/whl/cu").isdigit()
    # The Dockerfile's default is the CPU index, and the install reads the argument.
    dockerfile = DOCKERFILE.read_text()
    assert f"ARG TORCH_INDEX_URL={cpu}\n" in dockerfile
    assert '--index-url "$TORCH_INDEX_URL"' in dockerfile


def test_every_queue_is_consumed_exactly_once_and_beat_runs_once(config):
    consumed: list[str] = []
    beats = []
    for name, service in config["services"].items():
        words = argv(service.get("command") or [])
        if words[:3] == ["celery", "-A", "tessera"] and "worker" in words:
            queues = option(words, "--queues", "-Q")
            assert queues, f"{name} consumes no named queue"
            consumed += queues.split(",")
            assert "-B" not in words and "--beat" not in words, name
        if words[:3] == ["celery", "-A", "tessera"] and "beat" in words:
            beats.append(name)
    assert sorted(consumed) == sorted(QUEUES)
    assert beats == ["beat"]
    # The queues the Celery app declares, and where beat's tasks go, are these.
    from django.conf import settings

    from tessera.celery import app

    assert {queue.name for queue in app.conf.task_queues} == QUEUES
    assert {entry["options"]["queue"] for entry in settings.CELERY_BEAT_SCHEDULE.values()} == {
        "maintenance"
    }


def test_every_long_running_service_has_a_healthcheck(config):
    for name, service in config["services"].items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        assert service.get("restart") == "unless-stopped", name
    workers = [
        name
        for name, service in config["services"].items()
        if "worker" in argv(service.get("command") or [])
    ]
    assert len(workers) == 3
    for name in workers:
        test = " ".join(config["services"][name]["healthcheck"]["test"])
        # The container's own node ($$ is compose's escape of a literal $).
        assert "inspect ping" in test and "celery@$$HOSTNAME" in test, name
    for name in ("inference", "inference-gpu"):
        assert "/healthz" in " ".join(config["services"][name]["healthcheck"]["test"])


def test_evaluation_workers_can_build_the_sandbox(config):
    for name in ("worker-eval-cpu", "worker-eval-gpu"):
        service = config["services"][name]
        assert service["user"] == "root", name
        assert "SYS_ADMIN" in service["cap_add"], name
    # The others run as the image's unprivileged user, with no added capability.
    for name in ("web", "inference", "worker", "beat"):
        assert "user" not in config["services"][name] and "cap_add" not in config["services"][name]


def test_plain_http_on_localhost_out_of_the_box(config):
    env = config["services"]["web"]["environment"]
    assert env["DJANGO_DEBUG"] == "false"
    assert env["DJANGO_SECURE_SSL_REDIRECT"] == "false"
    assert env["DJANGO_SECURE_COOKIES"] == "false"
    assert str(env["DJANGO_SECURE_HSTS_SECONDS"]) == "0"
    assert env["TESSERA_STORAGE"] == "s3"
    assert env["AWS_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert config["services"]["minio"]["environment"]["MINIO_ROOT_USER"] == env["AWS_ACCESS_KEY_ID"]


def test_the_https_switches_follow_the_environment():
    result = docker_compose(
        "config",
        env=compose_env(
            **SECRETS,
            DJANGO_SECURE_SSL_REDIRECT="true",
            DJANGO_SECURE_HSTS_SECONDS="31536000",
            DJANGO_SECURE_COOKIES="true",
            DJANGO_SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        ),
    )
    assert result.returncode == 0, result.stderr
    env = yaml.safe_load(result.stdout)["services"]["web"]["environment"]
    assert env["DJANGO_SECURE_SSL_REDIRECT"] == "true"
    assert str(env["DJANGO_SECURE_HSTS_SECONDS"]) == "31536000"
    assert env["DJANGO_SECURE_COOKIES"] == "true"
    assert env["DJANGO_SECURE_PROXY_SSL_HEADER"] == "X-Forwarded-Proto"


SETTINGS_PROBE = """
import json
import tessera.settings as s
print(json.dumps({
    "debug": s.DEBUG,
    "storage": s.STORAGES["default"]["BACKEND"],
    "device": s.TESSERA_SERVING_DEVICE,
    "memory": s.TESSERA_SANDBOX_MEMORY_BYTES,
    "redirect": s.SECURE_SSL_REDIRECT,
    "database": s.DATABASES["default"]["HOST"],
}))
"""


@pytest.mark.parametrize("name", ["web", "inference-gpu", "worker-eval-gpu"])
def test_each_service_environment_loads_the_settings(config, name, tmp_path):
    """The settings module refuses a bad value at import: each distinct environment of the
    file, imported in a fresh interpreter with nothing else set."""
    env = {key: str(value) for key, value in config["services"][name]["environment"].items()}
    env["TESSERA_VAR_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", SETTINGS_PROBE],
        env=compose_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout)
    assert loaded["debug"] is False
    assert loaded["storage"] == "storages.backends.s3.S3Storage"
    assert loaded["redirect"] is False
    assert loaded["database"] == "postgres"
    assert loaded["device"] == {"inference-gpu": "cuda"}.get(name, "auto")
    assert loaded["memory"] == (0 if name == "worker-eval-gpu" else 12 * 1024**3)


def installed_packages() -> set[str]:
    """The top-level packages [tool.setuptools.packages.find] selects, as setuptools does."""
    from setuptools import find_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    found = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    return {package.split(".")[0] for package in found}


def test_the_image_copies_every_installed_package():
    packages = installed_packages()
    assert {"tessera", "tessera_cli", "contributions", "evaluation", "routing"} <= packages
    assert "multilora" in packages
    copied = set()
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(word.startswith("--from") for word in words):
            copied.update(word.rstrip("/") for word in words[1:-1])
    missing = packages - copied
    assert not missing, f"platform/Dockerfile does not COPY {sorted(missing)}"
    # And what the installed project reads from its root at run time.
    assert {"manage.py", "templates", "demo", "pyproject.toml", "README.md"} <= copied


def test_the_build_context_leaves_secrets_and_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", "var", ".git"} <= set(ignored)


SERVE = """
import sys
from wsgiref.simple_server import WSGIRequestHandler, make_server

from tessera.wsgi import application


class Quiet(WSGIRequestHandler):
    def log_message(self, *args):
        pass


server = make_server("127.0.0.1", 0, application, handler_class=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"""


@pytest.mark.parametrize(
    ("redirect", "database", "healthy"),
    [("true", None, True), ("false", None, True), ("true", "postgres://t:t@127.0.0.1:9/t", False)],
    ids=["https-enforced", "plain-http", "database-down"],
)
def test_the_web_health_check_against_django(config, tmp_path, redirect, database, healthy):
    """The web service's health check command, run against the real WSGI application on
    production settings: /readyz is exempt from the HTTPS redirect, so it answers 200 when
    the database and the cache answer, and 503 (unhealthy) when the database does not."""
    command = config["services"]["web"]["healthcheck"]["test"]
    assert command[:3] == ["CMD", "python", "-c"]
    env = compose_env(
        **SECRETS, TESSERA_VAR_DIR=str(tmp_path / "var"), DJANGO_SECURE_SSL_REDIRECT=redirect
    )
    env.pop("DATABASE_URL", None)
    if database:
        env["DATABASE_URL"] = database
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        check = command[3].replace("8000", str(port))
        assert check != command[3]
        result = subprocess.run(
            [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=60
        )
        # An answer either way, never a connection error: the status decides.
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.returncode == (0 if healthy else 1)
    finally:
        server.terminate()
        server.wait(timeout=30)
