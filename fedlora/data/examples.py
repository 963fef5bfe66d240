"""The data model: an example, one client's splits, and a federation of clients."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

#: a conversation: (role, content) pairs, ending with the assistant answer that is the example's target
Conversation = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Example:
    """One training example.

    Instruction data: ``instruction`` (+ optional ``input``) is the prompt, ``output`` the target.
    Classification: ``input`` is the text, ``label`` the class index; ``output`` is unused.
    ``category`` is the natural grouping (task, topic) used for per-client splits. ``meta``: a JSON string
    the source keeps for scoring (reasoning-gym's entry metadata), else None. ``messages``: chat data, the
    whole conversation (rendered with the tokenizer's chat template, :mod:`fedlora.data.chat`); then
    ``instruction`` is its last user message and ``output`` its final answer, for reading and scoring.
    """

    instruction: str = ""
    input: str = ""
    output: str = ""
    category: str | None = None
    label: int | None = None
    meta: str | None = None
    messages: Conversation | None = None


@dataclass(slots=True)
class ClientData:
    """One client's private data, already split into train / eval / test."""

    client_id: int
    name: str
    train: list[Example]
    eval: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "eval", "test"):
            raise ValueError(f"unknown split {name!r}; allowed: train, eval, test")
        return getattr(self, name)

    def size(self, split: str) -> int:
        return len(self.split(split))

    def with_id(self, client_id: int) -> ClientData:
        return self if client_id == self.client_id else replace(self, client_id=client_id)

    def capped(self, max_train: int | None, max_eval: int | None) -> ClientData:
        """At most ``max_train`` training and ``max_eval`` eval/test examples (None = no cap; this client
        itself when nothing is cut, so that 100,000 clients are not copied for nothing)."""
        if (not max_train or len(self.train) <= max_train) and (
            not max_eval or max(len(self.eval), len(self.test)) <= max_eval
        ):
            return self
        return replace(
            self,
            train=self.train[:max_train] if max_train else self.train,
            eval=self.eval[:max_eval] if max_eval else self.eval,
            test=self.test[:max_eval] if max_eval else self.test,
        )


@dataclass
class Federation:
    """All clients of an experiment; ``label_names`` is set for classification data."""

    clients: list[ClientData]
    description: str
    label_names: list[str] | None = None
    # clients that never train (zero-shot evaluation); ids continue after the training clients'
    held_out: list[ClientData] = field(default_factory=list)
    dropped_empty: int = 0  # clients dropped because they had no training example

    @property
    def num_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None

    def sizes(self, split: str = "train") -> list[int]:
        return [c.size(split) for c in self.clients]
