"""lm-evaluation-harness itself on fedlora's benchmark items: its official task configs (v0.4.13) with the
dataset pointed at a local JSONL of the items in the task's own schema, and its ``HFLM`` wrapping the same
model instance. ``tests/test_benchmarks.py`` and ``benchmarks/lm_eval_agreement.py`` check fedlora's scorer
(:mod:`fedlora.eval.benchmarks`) against it; lm-eval is a dev dependency (``pip install lm-eval``)."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fedlora.eval.benchmarks import ChoiceItem

#: each fedlora task's lm-eval config, relative to ``lm_eval/tasks``
CONFIGS = {
    "mmlu": "mmlu/default/_default_template_yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}


def lm_eval_config(name: str, data_file: Path) -> dict[str, Any]:
    """lm-eval's own config of task ``name`` (prompt, choices, target, metrics), its data ``data_file``."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / CONFIGS[name]
    config = yaml.safe_load(path.read_text())
    for key in (
        "include",
        "tag",
        "group",
        "training_split",
        "validation_split",
        "fewshot_split",
        "fewshot_config",
    ):
        config.pop(key, None)
    config.update(
        task=f"fedlora_{name}",
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {"test": str(data_file)}},
        test_split="test",
    )
    return config


def lm_eval_loglikelihoods(
    model: Any, tokenizer: Any, name: str, items: Sequence[ChoiceItem], batch_size: int = 8
) -> tuple[list[list[float]], dict[str, float]]:
    """Each item's choice log-likelihoods as lm-eval computes them, and lm-eval's task figures
    (``acc``, ``acc_stderr``, ...) for the same items (zero-shot)."""
    from lm_eval import evaluator
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory(prefix="fedlora-lm-eval-") as folder:
        data = Path(folder) / "items.jsonl"
        data.write_text("".join(json.dumps(item.doc) + "\n" for item in items))
        task = ConfigurableTask(config=lm_eval_config(name, data))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = evaluator.evaluate(
            lm=lm, task_dict={task.config.task: task}, log_samples=True, verbosity="ERROR"
        )
    assert out is not None
    samples = sorted(out["samples"][task.config.task], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    figures = {
        k.split(",")[0]: float(v)
        for k, v in out["results"][task.config.task].items()
        if k.startswith("acc") and isinstance(v, (int, float))
    }
    return lls, figures
