"""Where the examples come from, how they become prompts, and how pooled examples are split into clients."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from fedlora.config.sections.base import Section


class DataConfig(Section):
    """Where the examples come from and how they are shaped into prompts and targets."""

    #: a registered data source: reasoning-gym, natural-instructions, json, hf, bbc-news, or your own
    source: str = "reasoning-gym"
    #: json: a .json/.jsonl file; hf: a save_to_disk folder, a .parquet/.csv/.json(l)/.arrow file or a hub
    #: dataset id in the local Hugging Face cache; natural-instructions: file or folder
    path: str | None = None
    # reasoning-gym: one client per task (natural partition) unless partition.method says otherwise.
    tasks: list[str] = Field(default_factory=lambda: ["basic_arithmetic", "chain_sum", "gcd", "lcm"])
    #: reasoning-gym: generated problems per task
    examples_per_task: int = Field(64, ge=1)
    # natural-instructions: which file and how many of its clients (first N in file order; None = all).
    variant: Literal["mini", "full"] = "mini"
    #: natural-instructions: the first N task clients (None: all)
    max_clients: int | None = Field(None, ge=1)
    # json: field names of the instruction/input/output form, and the category used for natural splits.
    instruction_field: str = "instruction"
    #: json / hf: the field holding the optional input (context)
    input_field: str = "input"
    #: json / hf: the field holding the target response (classification: the label)
    output_field: str = "output"
    #: json / hf: the field holding the natural group (task, topic) of partition auto / natural
    category_field: str | None = "category"
    #: hf: which split of a dataset with several (a DatasetDict folder, a hub dataset)
    hf_split: str = "train"
    #: json, hf, rows: a chat column (a list of {role, content} messages, or ShareGPT's {from, value}) read
    #: instead of instruction/input/output and rendered whole by the tokenizer's chat template; a column
    #: named messages or conversations is found without it
    messages_field: str | None = None
    #: chat data: the loss on every assistant turn ("all", TRL's assistant_only_loss) or the final one ("last")
    assistant_loss: Literal["all", "last"] = "all"
    # Per-client split of pooled data (json, reasoning-gym, bbc-news); natural-instructions ships its own.
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    #: share of each client's pooled examples held out as its test split
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    #: cap on each client's training examples (None: all)
    max_train_examples_per_client: int | None = Field(None, ge=1)
    #: cap on each client's eval and test examples (None: all)
    max_eval_examples_per_client: int | None = Field(None, ge=1)
    #: auto (the tokenizer's chat template when it has one), chat, or alpaca (Alpaca's prompt)
    template: Literal["auto", "chat", "alpaca"] = "auto"
    #: loss on the prompt tokens too (default: on the response / assistant turns only)
    train_on_inputs: bool = False
    #: tokens per example at most (TRL's max_length; FlowerTune's seq-length): the prompt is cut from the left
    #: first
    max_seq_len: int = Field(256, ge=8)
    #: causal LM: pack each training batch's examples into rows of max_seq_len tokens (block-diagonal
    #: attention, positions restarting per example: no cross-example attention, the same loss, less padding)
    packing: bool = False
    #: seeds partitions, splits and generated data
    seed: int = 0
    #: a plugin data source's own settings (``data.options.sheet=2``), read as ``request.data.options``
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.eval_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                f"eval_fraction + test_fraction must be < 1 (got {self.eval_fraction} + {self.test_fraction})"
            )
        return self


class PartitionConfig(Section):
    """How pooled examples are split into clients.

    ``natural``: one client per category (task) value; ``iid``: uniform random shards;
    ``dirichlet``: per-client label/category proportions drawn from Dir(alpha) (small alpha = skewed);
    ``auto``: natural when every example has a category (label with ``by: label``), else iid into
    ``federation.num_clients`` (8 when unset).
    """

    #: a registered partitioner: auto, natural, iid, dirichlet, or your own
    method: str = "auto"
    #: dirichlet: the concentration (small alpha: skewed clients)
    alpha: float = Field(0.5, gt=0.0)
    #: what natural / dirichlet group by: category or label
    by: Literal["category", "label"] = "category"
    #: dirichlet: redraw until every client has at least this many examples
    min_partition_size: int = Field(2, ge=0)
