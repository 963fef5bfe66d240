"""LoRA on the shared base model through PEFT.

Convention (PEFT's, used by server and every client whatever their rank): a target module computes
``y = W0 x + s_r * B (A x)`` with ``A``: r x k (``lora_A.weight``), ``B``: d x r (``lora_B.weight``),
``s_r = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``) and r that module's own rank. ``alpha`` is one
number for the whole federation; a state carries only A and B (see :mod:`fedlora.adapters.ranks` for how
rank changes keep ``s_r B A``).

One base model is shared by all simulated clients: each distinct :class:`RankProfile` (rank on attention
modules, rank on MLP modules) gets its own PEFT adapter slot (``r8``, ``a30-m200``) on that one model, and
loading a client's state writes into the matching slot. Nothing is ever copied per client. Per-kind ranks
go through PEFT's ``rank_pattern``, so an exported adapter loads with plain PEFT at the same ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from transformers import PreTrainedModel

from fedlora.adapters.merged import MergedBase, split_merged
from fedlora.adapters.ranks import LoraScaling, RankProfile, module_kind, profile_of_state
from fedlora.adapters.state import AdapterState
from fedlora.compute import to_cpu, weight_of
from fedlora.config.schema import AdapterConfig

# rank_pattern key (PEFT matches it as ``(.*\.)?(KEY)$`` on module names) for modules that are NOT
# attention: anchored at the start of the name, no path component containing attn/attention.
MLP_MODULES_PATTERN = r"(?<![\w.])(?!.*(?i:attn|attention))[\w.]+"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear modules (what ``adapter.target_modules`` may name)."""
    return sorted(
        {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


class RankTooLargeError(ValueError):
    """A requested rank is above min(d, k) of a target module."""


@dataclass
class _Slot:
    """One PEFT adapter on the shared model: its name and PEFT key -> the live parameter tensor."""

    name: str
    tensors: dict[str, torch.nn.Parameter]


class LoraAdapters:
    """The PEFT-wrapped shared model and its rank slots.

    ``state(profile)`` / ``load(state)`` move adapter weights in and out as :data:`AdapterState` dicts. Each
    slot maps PEFT's state-dict keys to the parameter tensors once, when it is created (matched by storage,
    so no naming rule is assumed); afterwards reading and writing a state are plain tensor copies instead of
    a walk over every module of the model on each call.
    """

    def __init__(
        self, base_model: PreTrainedModel, cfg: AdapterConfig, task: str, head_in_adapter: bool = True
    ) -> None:
        """``head_in_adapter=False``: a classification head stays a base-model weight (not in the state)."""
        self.cfg = cfg
        self.task_type: TaskType | None = TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM
        if not head_in_adapter:
            self.task_type = None
        self.model: PeftModel | None = None
        self._base = base_model
        self._slots: dict[RankProfile, _Slot] = {}
        self._initial: dict[RankProfile, AdapterState] = {}
        self._active: RankProfile | None = None
        self._kinds: set[str] = set()
        #: the base weights' offset of a merging method (FLoRA, FedEx-LoRA): see fedlora.adapters.merged
        self.merged_base = MergedBase()
        self._base_weights: dict[str, torch.Tensor] = {}

    def lora_config(self, profile: RankProfile) -> LoraConfig:
        scaling = self.scaling
        mixed = profile.mlp != profile.attention
        return LoraConfig(
            r=profile.attention,
            rank_pattern={MLP_MODULES_PATTERN: profile.mlp} if mixed else {},
            lora_alpha=scaling.alpha_at(profile.attention),  # type: ignore[arg-type]  # PEFT annotates int; it scales by any float
            alpha_pattern={MLP_MODULES_PATTERN: scaling.alpha_at(profile.mlp)}
            if mixed and scaling.constant is not None
            else {},
            use_rslora=self.cfg.use_rslora,
            use_dora=self.cfg.use_dora,
            lora_dropout=self.cfg.dropout,
            target_modules=self.cfg.target_modules,
            task_type=self.task_type,
            bias="none",
        )

    def _lora_layers(self, slot_name: str) -> dict[str, LoraLayer]:
        assert self.model is not None
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, LoraLayer) and slot_name in module.lora_A
        }

    def _create_slot(self, profile: RankProfile) -> _Slot:
        name = profile.name
        # before PEFT allocates anything: no rank can exceed the largest min(d, k) of the model's linear
        # layers (a rank of 10^9 would otherwise ask for hundreds of GB first)
        base = self._base if self.model is None else self.model.get_base_model()
        limit = max(
            (min(m.in_features, m.out_features) for m in base.modules() if isinstance(m, torch.nn.Linear)),
            default=0,
        )
        for kind, rank in (("attention", profile.attention), ("mlp", profile.mlp)):
            if rank > limit:
                raise RankTooLargeError(
                    f"rank {rank} on {kind} modules is above min(d, k) = {limit} of every linear layer of the "
                    "model; lower adapter.rank / resources.rank_types or set resources.rank_scale"
                )
        with torch.random.fork_rng():
            torch.manual_seed(self.cfg.init_seed)
            try:
                if self.model is None:
                    self.model = get_peft_model(self._base, self.lora_config(profile), adapter_name=name)
                else:
                    self.model.add_adapter(name, self.lora_config(profile))
            except ValueError as err:
                if "not found in the base model" not in str(err):
                    raise
                raise ValueError(
                    f"adapter.target_modules {self.cfg.target_modules}: no such module in the model; its linear "
                    f"modules are {', '.join(linear_module_names(base))} (or all-linear)"
                ) from None
        self.model.eval()  # PEFT returns a model in train mode; training switches it on explicitly
        layers = self._lora_layers(name)
        self._kinds = {module_kind(path) for path in layers}
        for path, layer in layers.items():
            rank, wanted = layer.r[name], profile.rank_for(path)
            d, k = int(layer.out_features or 0), int(layer.in_features or 0)  # PEFT: int | None before init
            problem = None
            if rank != wanted:
                problem = f"PEFT gave module {path} rank {rank}, expected {wanted}"
            elif rank > min(d, k):
                problem = (
                    f"rank {rank} on {module_kind(path)} modules is above min(d, k) = {min(d, k)} of {path} "
                    f"({k} -> {d}); lower adapter.rank / resources.rank_types or set resources.rank_scale"
                )
            if problem:
                if self._slots:
                    self.model.delete_adapter(name)
                else:  # the first injection failed: give back a clean base model
                    self._base = self.model.unload()
                    self.model = None
                raise RankTooLargeError(problem)
        by_storage = {(p.data_ptr(), p.shape): p for p in self.model.parameters()}
        tensors = {}
        for key, tensor in get_peft_model_state_dict(self.model, adapter_name=name).items():
            param = by_storage.get((tensor.data_ptr(), tensor.shape))
            if param is None:
                raise RuntimeError(f"PEFT state key {key} is not a parameter of the model")
            tensors[key] = param
        return _Slot(name, tensors)

    def canonical(self, profile: RankProfile | int) -> RankProfile:
        """The slot key of ``profile`` on this model (an int means that rank everywhere)."""
        if isinstance(profile, int):
            profile = RankProfile.uniform(profile)
        return profile.restricted_to(self._kinds) if self._kinds else profile

    def activate(self, profile: RankProfile | int) -> str:
        """Make the slot for ``profile`` active (created with seeded init on first use); returns its name."""
        key = self.canonical(profile)
        if key not in self._slots:
            slot = self._create_slot(key)
            key = self.canonical(key)  # the first slot tells which module kinds are targeted
            self._slots.setdefault(key, slot)
            self._initial.setdefault(key, to_cpu(slot.tensors))  # the seeded init, kept as created
        slot = self._slots[key]
        if self._active != key:
            assert self.model is not None
            self.model.set_adapter(slot.name)
            for param in self.model.parameters():
                param.requires_grad_(False)
            for param in slot.tensors.values():
                param.requires_grad_(True)
            self._active = key
        return slot.name

    @property
    def active_profile(self) -> RankProfile:
        if self._active is None:
            raise RuntimeError("no adapter slot is active yet")
        return self._active

    @property
    def active_slot_name(self) -> str:
        """The PEFT adapter name of the active slot (the key of each LoRA layer's ``lora_A`` / ``lora_B``)."""
        return self._slots[self.active_profile].name

    @property
    def module_kinds(self) -> set[str]:
        """Which module kinds (attention, mlp) the target modules cover (known once a slot exists)."""
        if not self._kinds:
            self.activate(self.cfg.rank)
        return set(self._kinds)

    def state(self, profile: RankProfile | int | None = None) -> AdapterState:
        """A detached copy of the weights of the slot for ``profile`` (default: the active one)."""
        key = self.active_profile if profile is None else self.canonical(profile)
        if key not in self._slots:
            self.activate(key)
            key = self.canonical(key)
        return to_cpu(self._slots[key].tensors)

    def initial_state(self, profile: RankProfile | int | None = None) -> AdapterState:
        """The seeded initial adapter (A ~ PEFT's Kaiming-uniform from ``init_seed``, B = 0), as the slot was
        created, whatever has been loaded into it since."""
        key = self.canonical(self.cfg.rank if profile is None else profile)
        if key not in self._slots:
            self.activate(key)
            key = self.canonical(key)
        return {k: v.clone() for k, v in self._initial[key].items()}

    def base_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The base model's own weights (no LoRA tensors), by name, for full-parameter training."""
        if self.model is None:
            self.activate(self.cfg.rank)
        assert self.model is not None
        named = [(n, p) for n, p in self.model.get_base_model().named_parameters() if "lora_" not in n]
        quantized = [n for n, p in named if not p.dtype.is_floating_point]
        if quantized:
            raise ValueError(
                f"model.quantization: this strategy trains the base model's own weights, but {quantized[0]} is "
                f"quantized ({len(quantized)} such tensors); set model.quantization: null for it"
            )
        return named

    def is_full_state(self, state: AdapterState) -> bool:
        """Whether ``state`` holds base-model weights (full-parameter training) rather than an adapter."""
        return not any(".lora_" in k for k in state)

    def load_base(self, state: AdapterState) -> None:
        """Copy full-parameter weights into the base model (every active LoRA slot stays as it is)."""
        params = dict(self.base_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"not weights of the base model: {unknown[:3]}")
        with torch.no_grad():
            for key, value in state.items():
                if value.shape != params[key].shape:
                    raise ValueError(
                        f"{key}: shape {tuple(value.shape)}, expected {tuple(params[key].shape)}"
                    )
                params[key].copy_(value)

    def load(self, state: AdapterState, partial: bool = False) -> RankProfile:
        """Write ``state`` into the slot of its rank profile and activate it; returns the profile.

        ``partial``: ``state`` may hold a subset of the slot's tensors (e.g. FFA-LoRA's B-only payloads);
        the others keep their values. Raises ValueError if keys or shapes do not match the slot.
        ``merged.*`` tensors set the base weights' offset (:mod:`fedlora.adapters.merged`); a state without
        them leaves the base weights pristine.
        """
        state, merged = split_merged(state)
        profile = self.canonical(profile_of_state(state))
        self.activate(profile)
        if merged or self.merged_base.original:
            self.merged_base.apply(self.base_weights(), merged)
        profile = self.active_profile
        expected = self._slots[profile].tensors
        if partial:
            expected = {k: v for k, v in expected.items() if k in state}
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
        return profile

    def base_weights(self) -> dict[str, torch.Tensor]:
        """Each target module's frozen base weight W0 (d x k), by module path (the state keys' prefix). Found
        once: every slot shares the same PEFT LoRA layers, so the mapping never changes after the first."""
        assert self.model is not None
        if not self._base_weights:
            self._base_weights = {
                name: weight_of(module.get_base_layer())
                for name, module in self.model.named_modules()
                if isinstance(module, LoraLayer)
            }
        return self._base_weights

    def lora_modules(self) -> dict[str, tuple[LoraLayer, str, str]]:
        """The active slot's target modules: path -> (PEFT LoRA layer, state key of A, state key of B)."""
        slot = self._slots[self.active_profile]
        out = {}
        for path, layer in self._lora_layers(slot.name).items():
            a_key, b_key = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
            if a_key not in slot.tensors or b_key not in slot.tensors:
                raise RuntimeError(f"no state keys for the LoRA factors of {path}")
            out[path] = (layer, a_key, b_key)
        return out

    @property
    def scaling(self) -> LoraScaling:
        """s_r, PEFT's LoRA scaling at rank r: alpha / r, or alpha / sqrt(r) with ``use_rslora``."""
        return LoraScaling(self.cfg.alpha, self.cfg.use_rslora, self.cfg.scale)

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The active slot's trainable tensors (LoRA factors and task heads), in PEFT's key order."""
        return list(self._slots[self.active_profile].tensors.items())
