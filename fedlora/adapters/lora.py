"""LoRA on the shared base model through PEFT.

Convention (PEFT's, used by server and every client whatever their rank): a target module computes
``y = W0 x + (alpha / r) * B (A x)`` with ``A``: r x k (``lora_A.weight``), ``B``: d x r (``lora_B.weight``),
``s = alpha / r``. ``alpha`` is one number for the whole federation; a state carries only A and B.

One base model is shared by all simulated clients: each distinct rank signature gets its own PEFT adapter
slot (named ``r<rank>``) on that one model, and loading a client's state writes into the matching slot.
Nothing is ever copied per client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel

from fedlora.adapters.state import AdapterState, lora_ranks
from fedlora.config.schema import AdapterConfig


@dataclass
class _Slot:
    """One PEFT adapter on the shared model: its name and PEFT key -> the live parameter tensor."""

    name: str
    tensors: dict[str, torch.nn.Parameter]


class LoraAdapters:
    """The PEFT-wrapped shared model and its rank slots.

    ``state(rank)`` / ``load(state)`` move adapter weights in and out as :data:`AdapterState` dicts. Each slot
    maps PEFT's state-dict keys to the parameter tensors once, when it is created (matched by storage, so
    no naming rule is assumed); afterwards reading and writing a state are plain tensor copies instead of a
    walk over every module of the model on each call.
    """

    def __init__(self, base_model: PreTrainedModel, cfg: AdapterConfig, task: str) -> None:
        self.cfg = cfg
        self.task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
        self.model: PeftModel | None = None
        self._base = base_model
        self._slots: dict[int, _Slot] = {}
        self._active: int | None = None

    def lora_config(self, rank: int) -> LoraConfig:
        return LoraConfig(
            r=rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules,
            task_type=self.task_type,
            bias="none",
        )

    def _create_slot(self, rank: int) -> _Slot:
        name = f"r{rank}"
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.init_seed)
            if self.model is None:
                self.model = get_peft_model(self._base, self.lora_config(rank), adapter_name=name)
            else:
                self.model.add_adapter(name, self.lora_config(rank))
        self.model.eval()  # PEFT returns a model in train mode; training switches it on explicitly
        by_storage = {(p.data_ptr(), p.shape): p for p in self.model.parameters()}
        tensors = {}
        for key, tensor in get_peft_model_state_dict(self.model, adapter_name=name).items():
            param = by_storage.get((tensor.data_ptr(), tensor.shape))
            if param is None:
                raise RuntimeError(f"PEFT state key {key} is not a parameter of the model")
            tensors[key] = param
        return _Slot(name, tensors)

    def activate(self, rank: int) -> str:
        """Make the slot for ``rank`` active (creating it with seeded init on first use); returns its name."""
        if rank not in self._slots:
            self._slots[rank] = self._create_slot(rank)
        slot = self._slots[rank]
        if self._active != rank:
            assert self.model is not None
            self.model.set_adapter(slot.name)
            for param in self.model.parameters():
                param.requires_grad_(False)
            for param in slot.tensors.values():
                param.requires_grad_(True)
            self._active = rank
        return slot.name

    @property
    def active_rank(self) -> int:
        if self._active is None:
            raise RuntimeError("no adapter slot is active yet")
        return self._active

    def state(self, rank: int | None = None) -> AdapterState:
        """A detached copy of the weights of the slot for ``rank`` (default: the active one)."""
        rank = self.active_rank if rank is None else rank
        if rank not in self._slots:
            self.activate(rank)
        return {k: p.detach().clone() for k, p in self._slots[rank].tensors.items()}

    def initial_state(self, rank: int | None = None) -> AdapterState:
        """The seeded initial adapter (A ~ PEFT's Kaiming-uniform from ``init_seed``, B = 0)."""
        return self.state(self.cfg.rank if rank is None else rank)

    def load(self, state: AdapterState) -> int:
        """Write ``state`` into the slot of its rank and activate it; returns the rank.

        Raises ValueError if keys or shapes do not match what the slot expects.
        """
        ranks = set(lora_ranks(state).values())
        if len(ranks) != 1:
            raise ValueError(f"adapter state must have one rank on every module, got {sorted(ranks)}")
        rank = ranks.pop()
        self.activate(rank)
        expected = self._slots[rank].tensors
        if expected.keys() != state.keys():
            missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
            raise ValueError(
                f"adapter state keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        with torch.no_grad():
            for key, param in expected.items():
                param.copy_(state[key])
        return rank

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The active slot's trainable tensors (LoRA factors and task heads), in PEFT's key order."""
        return list(self._slots[self.active_rank].tensors.items())

    def export(self, state: AdapterState, folder: Path, base_model_path: str) -> Path:
        """Write ``state`` as a standard PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

        The adapter config is the slot's own PEFT config (so task heads PEFT saves, e.g. ``score``, match).
        """
        import copy

        rank = self.load(state)
        assert self.model is not None
        config = copy.deepcopy(self.model.peft_config[self._slots[rank].name])
        config.base_model_name_or_path = base_model_path
        config.inference_mode = True
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        return folder
