"""Chat data: conversations read from a dataset's messages column and rendered by the tokenizer's own chat
template, as TRL's ``SFTTrainer`` does.

A conversation is a list of ``{"role", "content"}`` messages (ShareGPT's ``{"from", "value"}`` with
``human`` / ``gpt`` is read too). What the model sees is exactly
``tokenizer.apply_chat_template(messages, tokenize=True)``: a dataset's system message replaces the
template's default one, earlier exchanges stay turns of the conversation. The targets
(``data.assistant_loss``):

- ``all`` (default, TRL's ``assistant_only_loss=True``): every assistant turn is a target, from its first
  content token through the template's end-of-turn tokens; everything else is -100;
- ``last``: only the final assistant turn (the answer the evaluation scores).

Assistant spans are found by rendering the conversation's prefixes (``messages[:i]`` with the generation
prompt, then ``messages[:i + 1]``): the span of turn i is the text between them. This needs a template that
renders a conversation's prefix as a prefix of its text (ChatML, Llama 3, Qwen, Gemma...); one that does
not is refused with the name of the option that avoids it (``data.template: alpaca``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from fedlora.data.errors import DataError
from fedlora.data.examples import Conversation, Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
#: columns that hold chat data under their usual names (TRL's ``messages``, ShareGPT's ``conversations``)
CHAT_COLUMNS = ("messages", "conversations")


def read_conversation(value: Any, field: str, path: object, line: int | None = None) -> Conversation:
    """A dataset cell as a conversation ending with its last assistant message (later messages, a user's
    unanswered follow-up, are not part of any target and are dropped).

    Raises :class:`DataError` naming ``path:line`` (a file's line, a dataset's row) when the cell is not a
    list of messages or has no assistant answer after a first message."""
    if not isinstance(value, list) or not value:
        raise DataError(path, f"field {field!r} must be a non-empty list of messages", line)
    turns = []
    for message in value:
        if isinstance(message, dict) and "role" in message and "content" in message:
            turns.append((str(message["role"]), str(message["content"])))
        elif isinstance(message, dict) and message.get("from") in SHAREGPT_ROLES and "value" in message:
            turns.append((SHAREGPT_ROLES[message["from"]], str(message["value"])))
        else:
            raise DataError(
                path,
                f"field {field!r}: every message needs 'role' and 'content' (or ShareGPT's 'from'/'value')",
                line,
            )
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(
            path, "the conversation must end with a user message answered by an assistant message", line
        )
    return tuple(turns[: last + 1])


def find_chat_column(record: dict[str, Any], instruction_field: str) -> str | None:
    """The chat column of a record that has no ``instruction_field`` but one of :data:`CHAT_COLUMNS` holding
    a list (the column TRL users name ``messages``), else None."""
    if instruction_field in record:
        return None
    return next((c for c in CHAT_COLUMNS if isinstance(record.get(c), list)), None)


def conversation_example(conversation: Conversation, category: str | None) -> Example:
    """An example holding ``conversation``: its final answer is the ``output``, the user message before it
    the ``instruction``, and the turns before that, one ``role: content`` line each, the ``input`` (what a
    tokenizer without a chat template, ``data.template: alpaca``, is shown)."""
    *before, (_, answer) = conversation
    question = before[-1][1] if before and before[-1][0] == "user" else ""
    earlier = before[:-1] if question else before
    return Example(
        instruction=question,
        input="\n".join(f"{role}: {content}" for role, content in earlier),
        output=answer,
        category=category,
        messages=conversation,
    )


def as_messages(turns: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


def chat_prompt(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> str:
    """The text before the final answer: every turn before it, then the template's generation prompt."""
    return _render(tokenizer, conversation[:-1], True)


def _render(tokenizer: PreTrainedTokenizerBase, turns: Conversation, generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            as_messages(turns), tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the (start, end) character span of each assistant turn in it."""
    text = _render(tokenizer, conversation, False)
    spans = []
    for i, (role, _) in enumerate(conversation):
        if role != "assistant":
            continue
        start = len(_render(tokenizer, conversation[:i], True))
        end_text = _render(tokenizer, conversation[: i + 1], False)
        if not text.startswith(end_text) or start > len(end_text):
            raise DataError(
                "data.messages_field",
                "the tokenizer's chat template does not render a conversation's first turns as the start of "
                "its text, so assistant turns cannot be located; set data.template: alpaca",
            )
        spans.append((start, len(end_text)))
    return text, spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase, conversation: Conversation, loss_on: str
) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, answer_start)``: the ids of ``apply_chat_template(conversation)``, the labels
    (-100 outside the targets ``loss_on`` names: ``all`` assistant turns or the ``last``) and the index of
    the final answer's first token (the prompt / response boundary used to truncate)."""
    text, spans = assistant_spans(tokenizer, conversation)
    targets = spans if loss_on == "all" else spans[-1:]
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        starts = [start for start, _ in encoded["offset_mapping"]]
    else:  # a slow tokenizer has no offsets: tokenise the pieces between span boundaries
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        ids, starts = [], []
        for a, b in zip(cuts, cuts[1:], strict=False):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            ids += piece
            starts += [a] * len(piece)
    labels = [
        token if any(a <= start < b for a, b in targets) else -100
        for token, start in zip(ids, starts, strict=True)
    ]
    answer = spans[-1][0]
    answer_start = next((i for i, start in enumerate(starts) if start >= answer), len(ids))
    return ids, labels, answer_start
