"""From a config to a :class:`Federation`: read the source, partition, split, cap, drop empty clients."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config.schema import DataConfig, ExperimentConfig, FederationConfig, PartitionConfig
from fedlora.data.examples import ClientData, Example, Federation
from fedlora.data.lazy import lazy_natural_instructions
from fedlora.data.partition import partition_examples, split_client
from fedlora.data.sources import (
    bbc_news_examples,
    find_natural_instructions,
    instruction_examples,
    iter_json_records,
    reasoning_gym_examples,
)
from fedlora.registry import Registry, UnknownName

log = logging.getLogger(__name__)


@dataclass
class SourceData:
    """What a data source yields: pooled ``examples`` to partition, or ready ``clients`` (already one per
    task, e.g. Natural Instructions kept on disk), with the label names of a classification set."""

    description: str
    examples: list[Example] | None = None
    clients: list[ClientData] | None = None
    label_names: list[str] | None = None


@dataclass(frozen=True)
class SourceRequest:
    """What a data source is given: the ``data`` section (its own fields, and ``data.options`` for a plugin
    source's own options) and the three facts from other sections that shape what a source yields."""

    data: DataConfig
    #: ``model.task``: a classification source yields label names
    task: str = "causal-lm"
    #: ``partition.method``: a source already federated (one client per task) needs ``natural`` / ``auto``
    partition_method: str = "auto"
    #: ``federation.num_clients``: how many clients a pre-federated source yields at most
    num_clients: int | None = None

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> SourceRequest:
        return cls(cfg.data, cfg.model.task, cfg.partition.method, cfg.federation.num_clients)


DataSource = Callable[[SourceRequest], SourceData]
#: data.source -> fn(request) -> SourceData
DATA_SOURCES: Registry[DataSource] = Registry("data source", "data.source")


#: every ``model.task`` (what a source supplies unless it says otherwise)
ALL_TASKS = ("causal-lm", "classification")


def register_data_source(name: str, tasks: tuple[str, ...] = ALL_TASKS) -> Callable[[DataSource], DataSource]:
    """Decorator: ``fn(request) -> SourceData``, ``request`` a :class:`SourceRequest` (``request.data``: the
    data section; a plugin source's own settings are ``request.data.options``). ``tasks``: the ``model.task``
    values it supplies data for (kept on the registered function; the preflight refuses the others)."""
    register = DATA_SOURCES.register(name)

    def add(fn: DataSource) -> DataSource:
        fn.fedlora_tasks = tasks  # type: ignore[attr-defined]  # the fact lives on the registered entry
        return register(fn)

    return add


def source_tasks(source: DataSource) -> tuple[str, ...]:
    """The ``model.task`` values a registered data source supplies (all, unless it was registered with fewer)."""
    return tuple(getattr(source, "fedlora_tasks", ALL_TASKS))


@register_data_source("natural-instructions", tasks=("causal-lm",))
def natural_instructions_source(request: SourceRequest) -> SourceData:
    if request.partition_method not in ("natural", "auto"):
        raise ValueError(
            "natural-instructions is federated by task already: partition.method must be 'natural' (or 'auto')"
        )
    path = find_natural_instructions(request.data.path, request.data.variant)
    limit = request.num_clients or request.data.max_clients
    clients = lazy_natural_instructions(path, max_clients=limit)  # examples stay on disk until used
    description = f"Natural Instructions ({path.name}, {len(clients)} task clients)"
    # a LazyClientData is read as a ClientData (the same attributes; examples loaded when first used)
    return SourceData(description, clients=clients)  # type: ignore[arg-type]


@register_data_source("reasoning-gym", tasks=("causal-lm",))
def reasoning_gym_source(request: SourceRequest) -> SourceData:
    data = request.data
    examples = reasoning_gym_examples(data.tasks, data.examples_per_task, data.seed)
    return SourceData(f"reasoning-gym ({len(data.tasks)} tasks x {data.examples_per_task})", examples)


@register_data_source("bbc-news", tasks=("classification",))
def bbc_news_source(request: SourceRequest) -> SourceData:
    examples, label_names = bbc_news_examples()
    return SourceData(
        f"BBC News ({len(examples)} articles, {len(label_names)} topics)", examples, None, label_names
    )


@register_data_source("json")
def json_source(request: SourceRequest) -> SourceData:
    data = request.data
    if not data.path:
        raise ValueError("data.source 'json' needs data.path")
    if Path(data.path).is_dir() or Path(data.path).suffix in (".parquet", ".arrow", ".csv"):
        raise ValueError(
            f"data.path {data.path!r} is not a JSON/JSONL file: read it with data.source: hf (datasets folders "
            "made by save_to_disk, parquet, CSV and Arrow files)"
        )
    return records_source(request, list(iter_json_records(data.path)), data.path, data.path)


@register_data_source("hf")
def hf_source(request: SourceRequest) -> SourceData:
    """Rows read through Hugging Face ``datasets`` (:func:`fedlora.data.hf.load_rows`), then as
    :func:`rows_source` (field names, ``messages_field``, partitioning)."""
    from fedlora.data.hf import load_rows

    data = request.data
    if not data.path:
        raise ValueError(
            "data.source 'hf' needs data.path: a save_to_disk folder, a .parquet/.csv/.json(l)/.arrow file or a "
            "hub dataset id in the local Hugging Face cache"
        )
    rows, description = load_rows(data.path, data.hf_split)
    return records_source(request, list(enumerate(rows, start=1)), f"{data.path} row", description, "rows")


def rows_source(request: SourceRequest, rows: Iterable[dict[str, Any]]) -> SourceData:
    """A dataset given in Python (a ``datasets.Dataset``, a list of dicts...) as a source: its rows read with
    the config's field names (``data.instruction_field`` ...), then partitioned as the config says."""
    numbered = list(enumerate(rows, start=1))
    return records_source(request, numbered, "dataset row", "a dataset given in Python", "rows")


def records_source(
    request: SourceRequest,
    records: list[tuple[int, dict[str, Any]]],
    where: str,
    label: str,
    unit: str = "examples",
) -> SourceData:
    """Numbered records (a file's lines, a dataset's rows; ``where`` names them in errors) read with the
    config's field names: instruction / input / output, or the chat column ``data.messages_field``
    (found when it is named ``messages`` or ``conversations``); labels for classification. Described as
    ``label (N unit)``."""
    data = request.data
    label_names = None
    if request.task == "classification":
        label_names = sorted({str(r.get(data.output_field)) for _, r in records})
    fields = (data.instruction_field, data.input_field, data.output_field, data.category_field)
    examples = instruction_examples(
        records, where, *fields, label_names=label_names, messages_field=data.messages_field
    )
    return SourceData(f"{label} ({len(examples)} {unit})", examples, None, label_names)


def build_federation(cfg: ExperimentConfig, source: SourceData | None = None) -> Federation:
    """Build every client's train/eval/test data as the config says (``source``: data given directly,
    instead of ``data.source``)."""
    return federate(
        cfg.data, cfg.partition, cfg.federation, cfg.model.task, cfg.eval.held_out_clients, source
    )


def federate(
    data: DataConfig,
    part: PartitionConfig,
    fed: FederationConfig,
    task: str,
    held_out_clients: int = 0,
    source: SourceData | None = None,
) -> Federation:
    """The clients: ``data.source`` read (or ``source``), partitioned by ``part`` into ``fed.num_clients``,
    each split into train/eval/test and capped, empty ones dropped, ``held_out_clients`` seeded clients set
    apart (they never train), ids given in order."""
    if source is None:
        try:
            request = SourceRequest(data, task, part.method, fed.num_clients)
            source = DATA_SOURCES.get(data.source)(request)
        except UnknownName as err:
            raise ValueError(str(err)) from None
    label_names, description = source.label_names, source.description
    if task == "classification" and not label_names:
        raise ValueError(
            f"model.task 'classification' needs labelled data; data.source {data.source!r} has no labels"
        )
    if source.clients is not None:
        clients = source.clients
    else:
        assert source.examples is not None, (
            f"data source {data.source!r} returned neither examples nor clients"
        )
        shards = partition_examples(
            source.examples,
            part.method,
            fed.num_clients,
            data.seed,
            part.alpha,
            part.by,
            part.min_partition_size,
        )
        clients = []
        for i in range(len(shards)):
            shard, shards[i] = (
                shards[i],
                [],
            )  # each shard freed once split: one copy of 100,000 clients at a time
            name = _client_name(i, shard, part.method)
            clients.append(split_client(i, name, shard, data.eval_fraction, data.test_fraction, data.seed))
        description += f", {part.method} partition"
    clients = [
        c.capped(data.max_train_examples_per_client, data.max_eval_examples_per_client) for c in clients
    ]
    if source.examples is not None:  # pooled rows: say how many ended in no split (caps, partitioning)
        used = sum(c.size(split) for c in clients for split in ("train", "eval", "test"))
        unused = len(source.examples) - used
        if unused > 0:
            caps = f"data.max_train_examples_per_client={data.max_train_examples_per_client}, "
            caps += f"data.max_eval_examples_per_client={data.max_eval_examples_per_client}"
            log.warning(
                "%d of %d rows are in no client's train/eval/test split (%s; partition.min_partition_size=%d)",
                unused,
                len(source.examples),
                caps,
                part.min_partition_size,
            )
            description += f"; {unused} of {len(source.examples)} rows unused"
    kept = [c for c in clients if c.size("train") > 0]
    if len(kept) < len(clients):
        log.warning("dropped %d client(s) with no training examples", len(clients) - len(kept))
        description += f"; {len(clients) - len(kept)} empty clients dropped"
    if not kept:
        raise ValueError("no client has training examples")
    kept, held_out = hold_out(kept, held_out_clients, fed.seed)
    kept = [c.with_id(i) for i, c in enumerate(kept)]
    held_out = [c.with_id(len(kept) + i) for i, c in enumerate(held_out)]
    if held_out:
        description += f"; {len(held_out)} held-out clients never train"
    return Federation(
        kept, description, label_names, held_out, dropped_empty=len(clients) - len(kept) - len(held_out)
    )


def hold_out(clients: list[ClientData], count: int, seed: int) -> tuple[list[ClientData], list[ClientData]]:
    """Split off ``count`` seeded clients that never train (order kept in both parts)."""
    if count == 0:
        return clients, []
    if count >= len(clients):
        raise ValueError(
            f"eval.held_out_clients ({count}) leaves no training client: the data yields {len(clients)} clients"
        )
    chosen = set(random.Random(f"{seed}/held-out").sample(range(len(clients)), count))
    train = [c for i, c in enumerate(clients) if i not in chosen]
    return train, [c for i, c in enumerate(clients) if i in chosen]


def _client_name(index: int, shard: list, method: str) -> str:
    """Natural clients (one category each) are named by their category (task); others by their index."""
    first = shard[0].category
    if method in ("natural", "auto") and first and all(e.category == first for e in shard):
        return first
    return f"client-{index}"
