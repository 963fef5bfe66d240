import gzip
import json
import multiprocessing
from pathlib import Path

import pytest

from conftest import NI_DIR
from fedlora.data.encoding import Encoder, batches_for_steps, collate, steps_for
from fedlora.data.errors import DataError
from fedlora.data.examples import Example
from fedlora.data.lazy import lazy_natural_instructions
from fedlora.data.sources import (
    bbc_news_examples,
    load_instruction_file,
    reasoning_gym_examples,
)
from fedlora.models.tiny import byte_level_tokenizer


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON"):
        load_instruction_file(path)


def test_missing_output_field_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'output'"):
        load_instruction_file(path)


def test_json_array_and_category(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "context": "x", "response": "b", "category": "qa"}]))
    [ex] = load_instruction_file(path, input_field="context", output_field="response")
    assert ex == Example(instruction="a", input="x", output="b", category="qa")


def test_missing_file() -> None:
    with pytest.raises(DataError, match="file not found"):
        load_instruction_file("/nonexistent/x.jsonl")


@pytest.mark.skipif(not NI_DIR.exists(), reason="../shared/data/natural-instructions not present")
def test_natural_instructions_mini_reads_clients() -> None:
    clients = lazy_natural_instructions(NI_DIR / "ni1613-mini.jsonl.gz", max_clients=5)
    assert len(clients) == 5
    for c in clients:
        assert 0 < len(c.train) <= 24 and len(c.eval) <= 6 and len(c.test) <= 6
        assert c.size("train") == len(c.train) and c.size("test") == len(c.test)
        assert c.train[0].instruction and c.train[0].output
    capped = clients[0].capped(3, 2)
    assert capped.size("train") == len(capped.train) == 3 and len(capped.test) == 2


def test_lazy_clients_read_only_their_own_line(tmp_path: Path) -> None:
    path = tmp_path / "ni.jsonl"
    records = [
        {
            "client_id": i,
            "task": f"task{i}",
            "instruction": f"do {i}",
            "train": [{"input": str(i), "output": "o"}] * (i + 1),
        }
        for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    clients = lazy_natural_instructions(path)
    assert [c.name for c in clients] == ["task0", "task1", "task2"] and [
        c.size("train") for c in clients
    ] == [1, 2, 3]
    assert clients[2].train[0].instruction == "do 2" and clients[2].with_id(7).client_id == 7
    assert lazy_natural_instructions(path, max_clients=2)[1].train[0].input == "1"  # the index is reused


def _build_index_in_process(path: str, folder: str) -> None:
    from fedlora.data.lazy import build_index

    build_index(Path(path), Path(folder))


def test_processes_building_one_index_at_once_do_not_collide(tmp_path: Path) -> None:
    """Two sweeps started together on a fresh cache both build the index (each with its own temporary
    files): both succeed and the index is whole."""
    path = tmp_path / "ni.jsonl"
    record = {"instruction": "copy", "train": [{"input": "x" * 200, "output": "y"}] * 20}
    path.write_text("".join(json.dumps({"client_id": i, **record}) + "\n" for i in range(3000)))
    folder = tmp_path / "index"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_build_index_in_process, args=(str(path), str(folder))) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert sorted(p.name for p in folder.iterdir()) == ["clients.jsonl", "index.json"]
    assert len(json.loads((folder / "index.json").read_text())["clients"]) == 3000


def test_natural_instructions_bad_record_names_line(tmp_path: Path) -> None:
    path = tmp_path / "ni.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(
            json.dumps({"client_id": 0, "instruction": "i", "train": [{"input": "a", "output": "b"}]}) + "\n"
        )
        f.write(json.dumps({"client_id": 1, "train": []}) + "\n")
    with pytest.raises(DataError, match=r"ni\.jsonl\.gz:2"):
        lazy_natural_instructions(path)


def test_reasoning_gym_is_seeded() -> None:
    a = reasoning_gym_examples(["gcd", "chain_sum"], 5, seed=3)
    assert len(a) == 10 and {e.category for e in a} == {"gcd", "chain_sum"}
    assert a == reasoning_gym_examples(["gcd", "chain_sum"], 5, seed=3)
    with pytest.raises(ValueError, match="unknown reasoning-gym"):
        reasoning_gym_examples(["no_such_task"], 1, 0)


def test_bbc_news_sorted_classes() -> None:
    examples, labels = bbc_news_examples()
    assert labels == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(examples) == 2225
    assert examples[0].label == 0 and examples[-1].label == 4


def test_loss_only_on_response_tokens() -> None:
    tok = byte_level_tokenizer()
    enc = Encoder(tok, "causal-lm", max_seq_len=512, template="alpaca")
    item = enc.encode(Example(instruction="Add 2 and 2.", output="4"))
    n_target = sum(1 for x in item["labels"] if x != -100)
    assert n_target == 2  # "4" + EOS
    assert item["labels"][-2:] == item["input_ids"][-2:] and item["input_ids"][-1] == tok.eos_token_id
    full = Encoder(tok, "causal-lm", 512, "alpaca", train_on_inputs=True).encode(
        Example(instruction="Add 2 and 2.", output="4")
    )
    assert full["labels"] == full["input_ids"]


def test_truncation_keeps_response_and_limit() -> None:
    tok = byte_level_tokenizer()
    enc = Encoder(tok, "causal-lm", max_seq_len=64, template="alpaca")
    item = enc.encode(Example(instruction="x" * 500, output="answer"))
    assert len(item["input_ids"]) == 64
    assert sum(1 for x in item["labels"] if x != -100) == len("answer") + 1
    long = enc.encode(Example(instruction="q", output="y" * 500))
    assert len(long["input_ids"]) == 64 and sum(1 for x in long["labels"] if x != -100) >= 32


def test_collate_pads_with_ignored_labels() -> None:
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_batches_for_steps_cycles_epochs() -> None:
    import torch

    data = [{"i": i} for i in range(5)]
    batches = batches_for_steps(data, 2, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [2, 2, 1, 2]
    assert sorted(x["i"] for b in batches[:3] for x in b) == [0, 1, 2, 3, 4]
    assert (
        steps_for(10, 4, None, 1.0) == 3
        and steps_for(10, 4, None, 2.0) == 6
        and steps_for(10, 4, 7, None) == 7
    )
