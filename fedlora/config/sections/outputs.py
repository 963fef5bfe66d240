"""What a run measures and what it writes: evaluation and the run folder's outputs and trackers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedlora.config.sections.base import Section


class EvalConfig(Section):
    """Evaluation of the global adapter after a round (``every`` rounds and after the last).

    Protocols: with ``held_out_clients: N > 0``, N seeded clients never train and the global model is
    evaluated on them (zero-shot generalisation, FlexLoRA's protocol); otherwise on the training clients'
    own ``split``. ``max_clients``: a fixed seeded sample of the evaluation clients (None = all) so
    evaluation does not dominate run time. ``metrics`` run at every evaluation; ``final_metrics`` only after
    the last round (e.g. the slower generation metrics). Evaluators: ``loss``, ``rouge-l``, ``exact-match``.
    """

    #: evaluate the global adapter every N rounds (and after the last)
    every: int = Field(1, ge=1)
    #: which split of each client's data: eval or test
    split: Literal["eval", "test"] = "eval"
    #: a fixed seeded sample of the evaluation clients (None: all)
    max_clients: int | None = Field(None, ge=1)
    #: the same for the final evaluation (None: all)
    final_max_clients: int | None = Field(None, ge=1)
    #: N seeded clients never train; the global adapter is evaluated on them (zero-shot)
    held_out_clients: int = Field(0, ge=0)
    #: examples per evaluation batch
    batch_size: int = Field(8, ge=1)
    #: evaluators run at every evaluation: loss (held-out loss and perplexity; accuracy and macro-F1 for
    #: classification), rouge-l, exact-match, task-score, or one registered by a plugin
    metrics: list[str] = Field(default_factory=lambda: ["loss"])
    #: evaluators run only after the last round (e.g. the slower generation metrics)
    final_metrics: list[str] = Field(default_factory=list)
    #: the length limit of greedy generations (generation metrics)
    max_new_tokens: int = Field(64, ge=1)
    #: benchmarks scored after the last round by multiple-choice log-likelihood, lm-evaluation-harness's
    #: acc / acc_norm with standard errors (model.task causal-lm): mmlu, boolq, piqa, commonsense_qa,
    #: openbookqa; written to RUN/eval/tasks.json (the same as ``fedlora eval RUN --tasks ...``)
    tasks: list[str] = Field(default_factory=list)
    #: the first N items of each benchmark (None: all of them)
    tasks_limit: int | None = Field(None, ge=1)
    #: solved examples before each benchmark question (few-shot; 0: zero-shot)
    tasks_fewshot: int = Field(0, ge=0)
    #: also score the base model (the untrained adapter) on the benchmarks, beside the adapter
    tasks_base: bool = False
    #: stop when ``early_stopping_metric`` has not improved for this many evaluated rounds (None: never);
    #: the best round's adapter is kept in RUN/best/
    early_stopping_patience: int | None = Field(None, ge=1)
    #: a per-round figure (``eval_loss``, ``eval_accuracy``, ``eval_rouge_l``...): losses and perplexities are
    #: better lower, everything else higher
    early_stopping_metric: str = "eval_loss"


class OutputConfig(Section):
    """Where the run directory goes and how many round checkpoints to keep (the newest ones)."""

    #: the run directory (None: output.root/<timestamp>-<name>)
    dir: str | None = None
    #: where run directories go when dir is not set
    root: str = "runs"
    #: round checkpoints kept (the newest ones)
    keep_checkpoints: int = Field(2, ge=1)
    #: write curves.png at the end of the run
    plot: bool = True
    #: experiment trackers beside metrics.jsonl: tensorboard, wandb (offline unless WANDB_MODE), mlflow (a
    #: file store in the run folder unless MLFLOW_TRACKING_URI), or one registered by a plugin
    trackers: list[str] = Field(default_factory=list)
    #: the W&B project / MLflow experiment the run goes into
    tracking_project: str = "fedlora"
    #: the same as listing tensorboard in trackers
    tensorboard: bool = False
    #: the training loss in metrics.jsonl and the trackers every N local optimizer steps (the mean of the
    #: clients' step losses over the window; ``loss_steps``), TRL's / the HF Trainer's logging_steps
    logging_steps: int = Field(1, ge=1)
    #: also export the global adapter every N rounds, as RUN/adapters/round_N/ (plain PEFT folders)
    save_every: int | None = Field(None, ge=1)
