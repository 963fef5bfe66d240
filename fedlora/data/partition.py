"""Splitting pooled examples into clients (through flwr-datasets' partitioners) and each client into
train / eval / test.

- ``iid``: a seeded shuffle, then flwr-datasets' ``IidPartitioner`` rule (equal contiguous shards);
- ``dirichlet``: ``DirichletPartitioner`` over the label or category column: client j's share of class c is
  drawn from Dir(alpha) (alpha -> 0: one class per client; alpha -> inf: IID), at least
  ``min_partition_size`` examples per client;
- ``natural``: ``NaturalIdPartitioner``, one client per distinct category (task), in sorted order;
- ``auto`` (the default): ``natural`` when every example has its group (``partition.by``), else ``iid`` into
  ``federation.num_clients`` clients (:data:`AUTO_IID_CLIENTS` when unset), so a plain Alpaca file runs.

Each is registered in ``PARTITIONERS``; user partitioners register with ``fedlora.register_partitioner``.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable
from typing import Any

from datasets import Dataset
from datasets.utils.logging import disable_progress_bar
from flwr_datasets.partitioner import DirichletPartitioner, NaturalIdPartitioner
from flwr_datasets.partitioner import natural_id_partitioner as _natural_id

from fedlora.data.examples import ClientData, Example
from fedlora.registry import Registry, UnknownName

log = logging.getLogger(__name__)
disable_progress_bar()
# flwr-datasets' NaturalIdPartitioner draws a tqdm bar over the examples of every natural split (TQDM_DISABLE
# is read when tqdm is imported, too early for a library to set): off, as datasets' own bars are
_natural_id.tqdm = functools.partial(_natural_id.tqdm, disable=True)


def _group_key(example: Example, by: str) -> str:
    if by == "label":
        if example.label is None:
            raise ValueError("partition.by 'label' needs labelled (classification) data; use 'category'")
        return str(example.label)
    if example.category is None:
        raise ValueError("partition.by 'category' needs a category on every example (data.category_field)")
    return example.category


Partitioner = Callable[..., list[list[Example]]]
#: partition.method -> fn(examples, num_clients, seed, alpha=, by=, min_partition_size=) -> client shards
PARTITIONERS: Registry[Partitioner] = Registry("partitioner", "partition.method")


def register_partitioner(name: str) -> Callable[[Partitioner], Partitioner]:
    """Decorator: ``fn(examples, num_clients, seed, *, alpha, by, min_partition_size) -> list of shards``."""
    return PARTITIONERS.register(name)


def partition_examples(
    examples: list[Example],
    method: str,
    num_clients: int | None,
    seed: int,
    alpha: float = 0.5,
    by: str = "category",
    min_partition_size: int = 2,
) -> list[list[Example]]:
    """Split ``examples`` into client shards (lists of examples), deterministically for a given seed."""
    if not examples:
        raise ValueError("no examples to partition")
    try:
        partitioner = PARTITIONERS.get(method)
    except UnknownName as err:
        raise ValueError(str(err)) from None
    return partitioner(examples, num_clients, seed, alpha=alpha, by=by, min_partition_size=min_partition_size)


@register_partitioner("natural")
def natural_partition(
    examples: list[Example], num_clients: int | None, seed: int, *, by: str = "category", **_: object
) -> list[list[Example]]:
    """One client per group (category or label), groups in key order; the first ``num_clients`` if given."""
    keys = [_group_key(e, by) for e in examples]
    table = Dataset.from_dict({"idx": list(range(len(examples))), "key": keys})
    partitioner = NaturalIdPartitioner(partition_by="key")
    partitioner.dataset = table
    # NaturalIdPartitioner numbers groups by first appearance; order them by key for stable client ids.
    shards = [partitioner.load_partition(i) for i in range(partitioner.num_partitions)]
    shards.sort(key=lambda shard: shard["key"][0])
    if num_clients is not None and num_clients != len(shards):
        if num_clients > len(shards):
            raise ValueError(
                f"federation.num_clients ({num_clients}) is above the number of natural groups ({len(shards)})"
            )
        shards = shards[:num_clients]
    return [[examples[i] for i in shard["idx"]] for shard in shards]


#: clients of an ``auto`` partition of data without groups when ``federation.num_clients`` is unset
AUTO_IID_CLIENTS = 8


@register_partitioner("auto")
def auto_partition(
    examples: list[Example], num_clients: int | None, seed: int, *, by: str = "category", **_: object
) -> list[list[Example]]:
    """``natural`` when every example has its ``by`` group, else ``iid`` into ``num_clients`` (or
    :data:`AUTO_IID_CLIENTS`, at most one client per example)."""
    grouped = all((e.label if by == "label" else e.category) is not None for e in examples)
    if grouped:
        return natural_partition(examples, num_clients, seed, by=by)
    count = min(num_clients or AUTO_IID_CLIENTS, len(examples))
    log.info("partition.method auto: the examples have no %s, so an iid split into %d clients", by, count)
    return iid_partition(examples, count, seed)


def _client_count(examples: list[Example], num_clients: int | None, method: str) -> int:
    if num_clients is None:
        raise ValueError(f"partition.method {method!r} needs federation.num_clients")
    if num_clients > len(examples):
        raise ValueError(
            f"federation.num_clients ({num_clients}) is above the number of examples ({len(examples)})"
        )
    return num_clients


def _shards(examples: list[Example], table: Dataset, partitioner: Any, count: int) -> list[list[Example]]:
    partitioner.dataset = table
    return [[examples[i] for i in partitioner.load_partition(j)["idx"]] for j in range(count)]


@register_partitioner("iid")
def iid_partition(
    examples: list[Example], num_clients: int | None, seed: int, **_: object
) -> list[list[Example]]:
    """A seeded shuffle cut into ``num_clients`` contiguous shards of equal size (the first n mod N one
    larger): flwr-datasets' ``IidPartitioner`` rule (``Dataset.shard(contiguous=True)``), computed directly
    (its one ``load_partition`` per client took 143 s for 100,000 clients; a test keeps the two equal)."""
    count = _client_count(examples, num_clients, "iid")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    size, extra = divmod(len(order), count)
    shards, start = [], 0
    for j in range(count):
        end = start + size + (1 if j < extra else 0)
        shards.append([examples[i] for i in order[start:end]])
        start = end
    return shards


@register_partitioner("dirichlet")
def dirichlet_partition(
    examples: list[Example],
    num_clients: int | None,
    seed: int,
    *,
    alpha: float = 0.5,
    by: str = "category",
    min_partition_size: int = 2,
    **_: object,
) -> list[list[Example]]:
    """Group shares per client drawn from Dirichlet(alpha) (flwr-datasets' DirichletPartitioner)."""
    count = _client_count(examples, num_clients, "dirichlet")
    keys = [_group_key(e, by) for e in examples]
    table = Dataset.from_dict({"idx": list(range(len(examples))), "key": keys})
    partitioner = DirichletPartitioner(
        num_partitions=count,
        partition_by="key",
        alpha=alpha,
        min_partition_size=min_partition_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    return _shards(examples, table, partitioner, count)


def split_client(
    client_id: int, name: str, examples: list[Example], eval_fraction: float, test_fraction: float, seed: int
) -> ClientData:
    """Shuffle (seeded by ``seed`` and ``client_id``) and cut into train / eval / test.

    Each of eval and test gets round(fraction * n) examples, at least one when the fraction is positive
    and the client has three or more examples; train keeps the rest.
    """
    order = list(examples)
    random.Random(f"{seed}/{client_id}").shuffle(order)
    n = len(order)

    def count(fraction: float) -> int:
        return 0 if fraction <= 0 else max(1 if n >= 3 else 0, round(fraction * n))

    n_eval, n_test = count(eval_fraction), count(test_fraction)
    return ClientData(
        client_id=client_id,
        name=name,
        eval=order[:n_eval],
        test=order[n_eval : n_eval + n_test],
        train=order[n_eval + n_test :],
    )
