"""Chat data is what the tokenizer's own chat template makes of the whole conversation (as TRL renders it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora.data.chat import read_conversation
from fedlora.data.encoding import Encoder, render_prompt
from fedlora.data.federation import build_federation
from fedlora.preflight import config_from_dict

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from fedlora.models.registry import fetch_builtin

    return AutoTokenizer.from_pretrained(str(fetch_builtin("smollm2-135m-instruct")))


def chat_file(tmp_path: Path, rows: list[dict], name: str = "chat.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_conversation_is_the_chat_templates_own_token_ids(smollm2_tokenizer, tmp_path: Path) -> None:
    """Token ids equal ``apply_chat_template(messages)``; the dataset's system message replaces the default
    one; the loss covers every assistant turn (``all``) or the final one (``last``), end-of-turn included."""
    tok = smollm2_tokenizer
    rows = [{"messages": CONVERSATION, "category": "a"}] * 4
    cfg = config_from_dict(
        {
            "data": {
                "source": "json",
                "path": str(chat_file(tmp_path, rows)),
                "eval_fraction": 0.0,
                "test_fraction": 0.0,
            }
        }
    )
    [example] = {e.messages: e for c in build_federation(cfg).clients for e in c.train}.values()
    assert example.instruction == "Capital of France?" and example.output == "Paris"
    expected = tok.apply_chat_template(CONVERSATION, tokenize=True)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    encoded = Encoder(tok, "causal-lm", 512, "auto").encode(example)
    assert encoded["input_ids"] == expected
    text = tok.decode(expected)
    assert "You answer in one word." in text and "Hugging Face" not in text  # default system prompt gone
    targets = tok.decode([t for t in encoded["labels"] if t != -100])
    assert targets == "Hello!<|im_end|>\nParis<|im_end|>\n"
    last = Encoder(tok, "causal-lm", 512, "auto", assistant_loss="last").encode(example)
    assert last["input_ids"] == expected
    assert tok.decode([t for t in last["labels"] if t != -100]) == "Paris<|im_end|>\n"
    prompt = render_prompt(example, tok, "auto")
    assert prompt == tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(expected).startswith(prompt)


def test_a_long_conversation_keeps_the_final_answer(smollm2_tokenizer) -> None:
    from fedlora.data.chat import conversation_example

    example = conversation_example(read_conversation(CONVERSATION, "messages", "row"), None)
    full = Encoder(smollm2_tokenizer, "causal-lm", 512).encode(example)
    cut = Encoder(smollm2_tokenizer, "causal-lm", 16).encode(example)
    assert len(cut["input_ids"]) == 16 and cut["input_ids"] == full["input_ids"][-16:]
    assert cut["labels"] == full["labels"][-16:]


def test_a_messages_column_is_found_and_sharegpt_is_read(tmp_path: Path) -> None:
    sharegpt = [
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris"},
    ]
    for column, conversation in (("messages", CONVERSATION), ("conversations", sharegpt)):
        path = chat_file(tmp_path, [{column: conversation}] * 3, f"{column}.jsonl")
        cfg = config_from_dict({"data": {"source": "json", "path": str(path)}})
        examples = [e for c in build_federation(cfg).clients for e in c.train]
        assert examples and all(e.output == "Paris" and e.messages for e in examples)
        assert examples[0].messages[-2:] == (("user", "Capital of France?"), ("assistant", "Paris"))


def test_bad_conversations_name_the_line(tmp_path: Path) -> None:
    path = chat_file(
        tmp_path, [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hi"}]}]
    )
    cfg = config_from_dict({"data": {"source": "json", "path": str(path)}})
    with pytest.raises(
        ValueError, match=r"chat.jsonl:2: the conversation must end with a user message answered"
    ):
        build_federation(cfg)
    path = chat_file(tmp_path, [{"messages": [{"speaker": "user"}]}], "odd.jsonl")
    cfg = config_from_dict({"data": {"source": "json", "path": str(path)}})
    with pytest.raises(
        ValueError, match=r"odd.jsonl:1: field 'messages': every message needs 'role' and 'content'"
    ):
        build_federation(cfg)
