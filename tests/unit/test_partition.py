from collections import Counter

import pytest

from fedlora.data.examples import Example
from fedlora.data.partition import partition_examples, split_client


def labelled(n: int, classes: int = 5) -> list[Example]:
    return [
        Example(input=f"text {i}", output=str(i % classes), category=f"c{i % classes}", label=i % classes)
        for i in range(n)
    ]


def ids(shards: list[list[Example]]) -> list[list[str]]:
    return [[e.input for e in shard] for shard in shards]


def test_iid_sizes_cover_everything_once_and_are_deterministic() -> None:
    data = labelled(103)
    shards = partition_examples(data, "iid", 4, seed=1)
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    flat = [e.input for s in shards for e in s]
    assert sorted(flat) == sorted(e.input for e in data)
    assert ids(partition_examples(data, "iid", 4, seed=1)) == ids(shards)
    assert ids(partition_examples(data, "iid", 4, seed=2)) != ids(shards)


def _mean_classes_per_client(shards: list[list[Example]], threshold: float = 0.1) -> float:
    counts = []
    for shard in shards:
        c = Counter(e.label for e in shard)
        counts.append(sum(1 for v in c.values() if v >= threshold * len(shard)))
    return sum(counts) / len(counts)


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    data = labelled(1000)
    skewed = partition_examples(data, "dirichlet", 10, seed=0, alpha=0.1, by="label", min_partition_size=5)
    flat = partition_examples(data, "dirichlet", 10, seed=0, alpha=100.0, by="label", min_partition_size=5)
    assert sum(len(s) for s in skewed) == 1000 and sum(len(s) for s in flat) == 1000
    assert _mean_classes_per_client(skewed) < 3.0 < _mean_classes_per_client(flat)
    assert ids(
        partition_examples(data, "dirichlet", 10, seed=0, alpha=0.1, by="label", min_partition_size=5)
    ) == ids(skewed)


def test_natural_gives_one_client_per_category_in_sorted_order() -> None:
    data = [Example(instruction=str(i), output="x", category=cat) for i, cat in enumerate("bcabca")]
    shards = partition_examples(data, "natural", None, seed=0)
    assert [{e.category for e in s} for s in shards] == [{"a"}, {"b"}, {"c"}]
    assert [len(s) for s in shards] == [2, 2, 2]
    with pytest.raises(ValueError, match="natural groups"):
        partition_examples(data, "natural", 5, seed=0)


def test_label_partition_needs_labels() -> None:
    with pytest.raises(ValueError, match="labelled"):
        partition_examples(
            [Example(instruction="a", output="b", category="x")] * 4, "dirichlet", 2, 0, by="label"
        )


def test_split_client_fractions() -> None:
    client = split_client(3, "c", labelled(50), eval_fraction=0.1, test_fraction=0.2, seed=0)
    assert (len(client.train), len(client.eval), len(client.test)) == (35, 5, 10)
    assert split_client(3, "c", labelled(50), 0.1, 0.2, 0).eval == client.eval


@pytest.mark.parametrize(("n", "clients"), [(103, 10), (1000, 7), (20, 20), (5, 1)])
def test_iid_shards_are_flwr_datasets_iid_partitioner_s(n: int, clients: int) -> None:
    """fedlora computes the IID shards directly (one pass, for 100,000 clients); they are exactly what
    flwr-datasets' IidPartitioner gives for the same seeded shuffle."""
    import random

    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    from fedlora.data.examples import Example
    from fedlora.data.partition import iid_partition

    examples = [Example(instruction=f"q{i}", output=str(i)) for i in range(n)]
    order = list(range(n))
    random.Random(3).shuffle(order)
    partitioner = IidPartitioner(num_partitions=clients)
    partitioner.dataset = Dataset.from_dict({"idx": order})
    expected = [[examples[i] for i in partitioner.load_partition(j)["idx"]] for j in range(clients)]
    assert iid_partition(examples, clients, 3) == expected
