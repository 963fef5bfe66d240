"""LoRA on the shared base model through PEFT.

Convention (PEFT's, used by server and every client whatever their rank): a target module computes
``y = W0 x + (alpha / r) * B (A x)`` with ``A``: r x k (``lora_A.weight``), ``B``: d x r (``lora_B.weight``),
``s = alpha / r``. ``alpha`` is one number for the whole federation; a state carries only A and B.

One base model is shared by all simulated clients: each distinct rank signature gets its own PEFT adapter
slot (named ``r<rank>``) on that one model, and loading a client's state writes into the matching slot.
Nothing is ever copied per client.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedModel

from fedlora.adapters.state import AdapterState, clone_state, lora_ranks
from fedlora.config.schema import AdapterConfig


class LoraAdapters:
    """The PEFT-wrapped shared model and its rank slots.

    ``state(rank)`` / ``load(state)`` move adapter weights in and out as :data:`AdapterState` dicts.
    """

    def __init__(self, base_model: PreTrainedModel, cfg: AdapterConfig, task: str) -> None:
        self.cfg = cfg
        self.task_type = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
        self.model: PeftModel | None = None
        self._base = base_model
        self._slots: dict[int, str] = {}

    def lora_config(self, rank: int) -> LoraConfig:
        return LoraConfig(
            r=rank,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules,
            task_type=self.task_type,
            bias="none",
        )

    def activate(self, rank: int) -> str:
        """Make the slot for ``rank`` active (creating it with seeded init on first use); returns its name."""
        name = self._slots.get(rank)
        if name is None:
            name = f"r{rank}"
            with torch.random.fork_rng():
                torch.manual_seed(self.cfg.init_seed)
                if self.model is None:
                    self.model = get_peft_model(self._base, self.lora_config(rank), adapter_name=name)
                else:
                    self.model.add_adapter(name, self.lora_config(rank))
            self.model.eval()  # PEFT returns a model in train mode; training switches it on explicitly
            self._slots[rank] = name
        assert self.model is not None
        self.model.set_adapter(name)
        for param_name, param in self.model.named_parameters():
            param.requires_grad_(
                f".{name}." in param_name and ("lora_" in param_name or "modules_to_save" in param_name)
            )
        return name

    @property
    def active_rank(self) -> int:
        assert self.model is not None
        active = self.model.active_adapter
        return next(r for r, n in self._slots.items() if n == active)

    def state(self, rank: int | None = None) -> AdapterState:
        """A detached copy of the weights of the slot for ``rank`` (default: the active one)."""
        rank = self.active_rank if rank is None else rank
        name = self.activate(rank) if rank not in self._slots else self._slots[rank]
        assert self.model is not None
        return clone_state(get_peft_model_state_dict(self.model, adapter_name=name))

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
        name = self.activate(rank)
        assert self.model is not None
        expected = get_peft_model_state_dict(self.model, adapter_name=name)
        if expected.keys() != state.keys():
            missing, extra = expected.keys() - state.keys(), state.keys() - expected.keys()
            raise ValueError(
                f"adapter state keys differ: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
        set_peft_model_state_dict(self.model, state, adapter_name=name)
        return rank

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The active slot's trainable tensors, in a fixed (module) order."""
        assert self.model is not None
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def export(self, state: AdapterState, folder: Path, base_model_path: str) -> Path:
        """Write ``state`` as a standard PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

        The adapter config is the slot's own PEFT config (so task heads PEFT saves, e.g. ``score``, match).
        """
        import copy

        rank = self.load(state)
        assert self.model is not None
        config = copy.deepcopy(self.model.peft_config[self._slots[rank]])
        config.base_model_name_or_path = base_model_path
        config.inference_mode = True
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(folder))
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        return folder
