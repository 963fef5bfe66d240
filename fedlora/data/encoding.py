"""Prompt templating and tokenisation.

Causal LM: ``input_ids = prompt_ids + response_ids`` where ``response_ids`` end with EOS; ``labels`` copy
``input_ids`` with the prompt positions set to -100 (loss on the response tokens only) unless
``train_on_inputs``. When too long, the prompt is cut from the left first (its end, next to the response,
is kept), then the response from the right, so that at most ``max_seq_len`` tokens remain and the
response keeps at least half of them when it is that long.

Classification: the text is tokenised (truncated to ``max_seq_len``) and ``labels`` is the class index.

Packing (``data.packing``, causal LM, training batches only): the examples of a batch are placed into as few
rows of at most ``max_seq_len`` tokens as first-fit-decreasing finds, instead of one right-padded row each.
No example sees another: the attention mask is 4-D and block-diagonal-causal (token t of segment s attends
to tokens <= t of s only), position ids restart at 0 in every segment, and each segment's first label is
-100 (its first token is never a target, as in an unpacked row). The batch's loss, the mean over its target
tokens, is therefore the unpacked one; packing only removes padding. A batch still holds ``batch_size``
examples (unlike TRL's dataset-level packing, where a batch is a number of packed rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from fedlora.data.chat import chat_prompt, encode_conversation
from fedlora.data.examples import Example

if TYPE_CHECKING:
    from fedlora.config.schema import DataConfig

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def resolved_template(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """``chat`` or ``alpaca``: ``auto`` is ``chat`` when the tokenizer has a chat template."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template not in ("chat", "alpaca"):
        raise ValueError(f"unknown template {template!r}; allowed: auto, chat, alpaca")
    return template


def render_prompt(example: Example, tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """The prompt text the model sees before its response (``auto`` = chat template if the tokenizer has
    one). A conversation (``example.messages``) is rendered whole by the chat template up to its final
    answer (:func:`fedlora.data.chat.chat_prompt`)."""
    template = resolved_template(tokenizer, template)
    if template == "chat":
        if example.messages:
            return chat_prompt(tokenizer, example.messages)
        content = example.instruction + (f"\n\n{example.input}" if example.input else "")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        assert isinstance(prompt, str)  # tokenize=False: the rendered text
        return prompt
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if example.input else "",
        instruction=example.instruction,
        input_block=f"### Input:\n{example.input}\n\n" if example.input else "",
    )


@dataclass(frozen=True)
class Encoder:
    """Turns examples into model inputs for one task."""

    tokenizer: PreTrainedTokenizerBase
    task: str
    max_seq_len: int
    template: str = "auto"
    train_on_inputs: bool = False
    packing: bool = False
    #: conversations: the targets are ``all`` assistant turns or the ``last`` (:mod:`fedlora.data.chat`)
    assistant_loss: str = "all"

    @classmethod
    def for_data(cls, tokenizer: PreTrainedTokenizerBase, task: str, data: DataConfig) -> Encoder:
        """The encoder of ``task`` with the ``data`` section's length, template and packing settings."""
        return cls(
            tokenizer,
            task,
            data.max_seq_len,
            data.template,
            data.train_on_inputs,
            data.packing,
            data.assistant_loss,
        )

    def encode(self, example: Example) -> dict[str, list[int] | int]:
        if self.task == "classification":
            ids = self.tokenizer(example.input, truncation=True, max_length=self.max_seq_len)["input_ids"]
            if example.label is None:
                raise ValueError("classification example without a label")
            return {"input_ids": ids, "labels": int(example.label)}
        if example.messages and resolved_template(self.tokenizer, self.template) == "chat":
            ids, labels, answer = encode_conversation(self.tokenizer, example.messages, self.assistant_loss)
            if self.train_on_inputs:
                labels = list(ids)
            return self._fit(ids[:answer], labels[:answer], ids[answer:], labels[answer:])
        prompt_ids = self.tokenizer(
            render_prompt(example, self.tokenizer, self.template), add_special_tokens=False
        )["input_ids"]
        response = self.tokenizer(example.output, add_special_tokens=False)["input_ids"] + [
            self.tokenizer.eos_token_id
        ]
        prompt_labels = list(prompt_ids) if self.train_on_inputs else [-100] * len(prompt_ids)
        return self._fit(prompt_ids, prompt_labels, response, list(response))

    def _fit(
        self,
        prompt_ids: list[int],
        prompt_labels: list[int],
        response_ids: list[int],
        response_labels: list[int],
    ) -> dict[str, list[int] | int]:
        """At most ``max_seq_len`` tokens: the prompt cut from the left first, then the response from the
        right, the response keeping at least half the budget when it is that long."""
        budget = self.max_seq_len
        keep_response = min(len(response_ids), max(budget - len(prompt_ids), budget // 2))
        cut = max(0, len(prompt_ids) - (budget - keep_response))
        ids = prompt_ids[cut:] + response_ids[:keep_response]
        labels = prompt_labels[cut:] + response_labels[:keep_response]
        return {"input_ids": ids, "labels": labels}

    def token_count(self, example: Example) -> int:
        """How many tokens ``example`` encodes to (its ``input_ids``)."""
        ids = self.encode(example)["input_ids"]
        assert isinstance(ids, list)
        return len(ids)

    def encode_all(self, examples: list[Example]) -> list[dict[str, Any]]:
        return [self.encode(e) for e in examples]

    def training_batch(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A training batch of encoded examples: packed into rows of ``max_seq_len`` with ``packing``, else
        right-padded (:func:`collate`)."""
        pad = self.tokenizer.pad_token_id
        return pack(items, pad, self.max_seq_len) if self.packing else collate(items, pad)


class EncodedOnDemand(Sequence[dict[str, Any]]):
    """The encoded examples of a client, each tokenised the first time a batch uses it.

    Local training draws a few batches from clients that may hold thousands of examples; only those
    examples are tokenised (the same result as ``encoder.encode_all`` for every index that is read).
    """

    def __init__(self, encoder: Encoder, examples: list[Example]) -> None:
        self.encoder = encoder
        self.examples = examples
        self._done: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]  # ints only, no slices
        if index not in self._done:
            self._done[index] = self.encoder.encode(self.examples[index])
        return self._done[index]


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100."""
    width = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    seq_labels = isinstance(batch[0]["labels"], list)
    labels = (
        torch.full((len(batch), width), -100, dtype=torch.long)
        if seq_labels
        else torch.zeros(len(batch), dtype=torch.long)
    )
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"])
        attention[row, :n] = 1
        if seq_labels:
            labels[row, :n] = torch.tensor(item["labels"])
        else:
            labels[row] = item["labels"]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack(items: list[dict[str, Any]], pad_token_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Causal-LM examples packed first-fit-decreasing into rows of at most ``capacity`` tokens.

    Returns ``input_ids``, ``labels``, ``position_ids`` (rows x W) and ``attention_mask`` (rows x 1 x W x W,
    bool): position (q, k) is True iff q and k are in the same segment and k <= q. Padding forms its own
    segment (so no row of the mask is empty) and has label -100.
    """
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    rows: list[list[int]] = []
    room: list[int] = []
    for index in order:
        n = len(items[index]["input_ids"])
        slot = next((r for r, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(index)
        room[slot] -= n
    width = max(capacity - free for free in room)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, members in enumerate(rows):
        start = 0
        for segment, index in enumerate(members):
            ids, target = items[index]["input_ids"], items[index]["labels"]
            end = start + len(ids)
            input_ids[row, start:end] = torch.tensor(ids)
            labels[row, start + 1 : end] = torch.tensor(target[1:])
            positions[row, start:end] = torch.arange(len(ids))
            segments[row, start:end] = segment
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return {
        "input_ids": input_ids,
        "attention_mask": mask[:, None],
        "position_ids": positions,
        "labels": labels,
    }


def batches_for_steps(
    encoded: Sequence[dict[str, Any]], batch_size: int, steps: int, generator: torch.Generator
) -> list[list[dict[str, Any]]]:
    """``steps`` batches drawn epoch by epoch in a seeded random order (the last one of an epoch may be short)."""
    batches: list[list[dict[str, Any]]] = []
    while len(batches) < steps:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batches.append([encoded[i] for i in order[start : start + batch_size]])
            if len(batches) == steps:
                break
    return batches


def steps_for(num_examples: int, batch_size: int, local_steps: int | None, local_epochs: float | None) -> int:
    """Local steps of a round: ``local_steps`` as given, or ceil(epochs * ceil(n / batch))."""
    if local_steps is not None:
        return local_steps
    per_epoch = -(-num_examples // batch_size)
    return max(1, int(-(-(local_epochs or 1.0) * per_epoch // 1)))
