"""data.source: hf — datasets folders (save_to_disk), parquet / CSV / JSONL / Arrow files and chat columns,
all made here from real reasoning-gym rows (no download), read into the same federation."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from fedlora.config.loader import schema_config
from fedlora.data.federation import build_federation
from fedlora.data.sources import reasoning_gym_examples

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    examples = reasoning_gym_examples(["gcd", "lcm", "chain_sum"], 12, 0)
    return [
        {"instruction": e.instruction, "input": e.input, "output": e.output, "category": e.category}
        for e in examples
    ]


def federation(path: Path | str, **data):
    cfg = schema_config({"data": {"source": "hf", "path": str(path), **data}})
    return build_federation(cfg)


def summary(fed) -> list[tuple[str, int, int, int, str]]:
    return [(c.name, len(c.train), len(c.eval), len(c.test), c.train[0].output) for c in fed.clients]


def test_every_datasets_format_gives_the_same_federation(tmp_path: Path, rows) -> None:
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "rows.parquet"))
    table.to_csv(str(tmp_path / "rows.csv"), index=False)
    table.to_json(str(tmp_path / "rows.jsonl"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dict"))
    table.save_to_disk(str(tmp_path / "single"))
    reference = summary(
        build_federation(schema_config({"data": {"source": "json", "path": str(tmp_path / "rows.jsonl")}}))
    )
    assert len(reference) == 3 and sum(n for _, n, *_ in reference) > 0
    for path in ("rows.parquet", "rows.csv", "rows.jsonl", "dict", "single"):
        assert summary(federation(tmp_path / path)) == reference, path
    arrow = next((tmp_path / "single").glob("*.arrow"))
    assert summary(federation(arrow)) == reference


def test_a_chat_column_becomes_instruction_input_output(tmp_path: Path, rows) -> None:
    chats = [
        {
            "messages": [
                {"role": "system", "content": "You are exact."},
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["output"]},
            ],
            "category": r["category"],
        }
        for r in rows
    ]
    datasets.Dataset.from_list(chats).to_parquet(str(tmp_path / "chat.parquet"))
    fed = federation(tmp_path / "chat.parquet", messages_field="messages")
    example = fed.clients[0].train[0]
    source = next(r for r in rows if r["instruction"] == example.instruction)
    assert example.output == source["output"] and example.input == "system: You are exact."


def test_clear_errors(tmp_path: Path, rows) -> None:
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    cfg = schema_config({"data": {"source": "json", "path": str(tmp_path / "rows.parquet")}})
    with pytest.raises(ValueError, match="not a JSON/JSONL file: read it with data.source: hf"):
        build_federation(cfg)
    with pytest.raises(ValueError, match="no split 'validation'"):
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "d"))
        federation(tmp_path / "d", hf_split="validation")
    with pytest.raises(ValueError, match="no such dataset in the local Hugging Face cache"):
        federation("no-such-org/no-such-dataset")
    with pytest.raises(
        ValueError, match="squad: no such file or folder here, and no such dataset in the local"
    ):
        federation("squad")  # a hub id without an organisation is a hub id too
    with pytest.raises(ValueError, match="missing.jsonl: file or folder not found"):
        federation(tmp_path / "missing.jsonl")
    (tmp_path / "nulls.jsonl").write_text('{"instruction": "a", "output": null}\n')
    with pytest.raises(ValueError, match="nulls.jsonl row:1: field .output. is null"):
        federation(tmp_path / "nulls.jsonl")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="broken.parquet: cannot be read by datasets"):
        federation(tmp_path / "broken.parquet")
    bad = [{"messages": [{"role": "user", "content": "hi"}], "category": "x"}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match="bad.parquet row:1: the conversation must end"):
        federation(tmp_path / "bad.parquet", messages_field="messages")


def test_rows_in_no_split_are_counted_and_warned_about(tmp_path: Path, rows, caplog) -> None:
    datasets.Dataset.from_list(rows).to_json(str(tmp_path / "rows.jsonl"))
    full = federation(tmp_path / "rows.jsonl")
    assert "unused" not in full.description
    caplog.set_level("WARNING")
    capped = federation(
        tmp_path / "rows.jsonl", max_eval_examples_per_client=1, max_train_examples_per_client=5
    )
    kept = sum(c.size(s) for c in capped.clients for s in ("train", "eval", "test"))
    unused = len(rows) - kept
    assert unused > 0 and f"{unused} of {len(rows)} rows unused" in capped.description
    assert any(f"{unused} of {len(rows)} rows are in no client's" in r.message for r in caplog.records)
