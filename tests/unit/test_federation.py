"""From config to clients, for each data source."""

import json
from pathlib import Path

import pytest

from conftest import NI_DIR
from fedlora import load_config
from fedlora.data.federation import build_federation


def test_reasoning_gym_one_client_per_task(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["data.tasks=[gcd, lcm, chain_sum]", "data.examples_per_task=20", "data.eval_fraction=0.2"]
    )
    fed = build_federation(cfg)
    assert [c.name for c in fed.clients] == ["chain_sum", "gcd", "lcm"]
    assert [c.client_id for c in fed.clients] == [0, 1, 2]
    for c in fed.clients:
        assert (len(c.train), len(c.eval), len(c.test)) == (14, 4, 2)
        assert {e.category for e in c.train} == {c.name}


def test_json_dirichlet_over_categories_and_empty_clients(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [
        {"instruction": f"q{i}", "input": "", "output": f"a{i}", "category": f"cat{i % 4}"}
        for i in range(200)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(
        None,
        [
            f"data.path={path}",
            "data.source=json",
            "partition.method=dirichlet",
            "partition.alpha=0.3",
            "federation.num_clients=6",
            "data.max_eval_examples_per_client=null",
        ],
    )
    fed = build_federation(cfg)
    assert len(fed.clients) == 6
    assert sum(len(c.train) + len(c.eval) + len(c.test) for c in fed.clients) == 200


@pytest.mark.skipif(not NI_DIR.exists(), reason="../shared/data/natural-instructions not present")
def test_natural_instructions_federation() -> None:
    cfg = load_config(
        None,
        [
            f"data.path={NI_DIR}",
            "data.source=natural-instructions",
            "data.max_clients=7",
            "data.max_eval_examples_per_client=2",
        ],
    )
    fed = build_federation(cfg)
    assert len(fed.clients) == 7 and all(len(c.eval) <= 2 for c in fed.clients)
    bad = load_config(
        None,
        [
            "data.source=natural-instructions",
            "partition.method=iid",
            "federation.num_clients=3",
            "federation.clients_per_round=null",
        ],
    )
    with pytest.raises(ValueError, match="partition.method must be 'natural'"):
        build_federation(bad)


def test_bbc_news_classification_federation() -> None:
    cfg = load_config(
        None,
        [
            "model.task=classification",
            "data.source=bbc-news",
            "partition.method=dirichlet",
            "partition.by=label",
            "federation.num_clients=5",
            "data.max_eval_examples_per_client=null",
        ],
    )
    fed = build_federation(cfg)
    assert (
        fed.label_names == ["business", "entertainment", "politics", "sports", "tech"] and fed.num_labels == 5
    )
    assert sum(sum(fed.sizes(s)) for s in ("train", "eval", "test")) == 2225
