"""Config -> the pieces a run is made of: the federation, the clients' model(s), the wrapped strategy.

``build_simulation`` (server and in-process clients) and ``build_client_node`` (clients only: a Flower
ClientApp or a worker process) share one loader, so both sides hold the same model, adapters and data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.ranks import RankProfile, client_profiles, largest_profile
from fedlora.client.node import ClientNode
from fedlora.client.privacy import check_dp_support
from fedlora.compute import resolve_device, resolve_precision, to_cpu
from fedlora.config.schema import ExperimentConfig
from fedlora.data.encoding import Encoder
from fedlora.data.examples import Federation
from fedlora.data.federation import build_federation, federate
from fedlora.engine.node_spec import NodeSpec
from fedlora.engine.sampling import clients_per_round
from fedlora.engine.server import Server
from fedlora.engine.transport import RoundPlan, Simulation
from fedlora.errors import ConfigError
from fedlora.models.loading import ModelBundle, load_base_model
from fedlora.models.personal import ClientModels
from fedlora.strategies.base import ServerSetup, Strategy
from fedlora.strategies.client_privacy import ClientLevelPrivacy, ClientNoisePlan
from fedlora.strategies.privacy import DifferentialPrivacy, PrivacyLedger
from fedlora.strategies.registry import build_strategy
from fedlora.strategies.robustness import RobustAggregation, UpdateNormScreen


def server_device(cfg: ExperimentConfig) -> torch.device:
    """``compute.server_device`` (``auto``: the clients' ``compute.device``)."""
    name = cfg.compute.server_device
    return resolve_device(cfg.compute.device if name == "auto" else name)


@dataclass
class ClientSide:
    """The clients' model(s), adapters (one slot per rank profile in use), encoder and rank profiles."""

    bundle: ModelBundle
    adapters: LoraAdapters
    encoder: Encoder
    client_models: ClientModels | None
    profiles: list[RankProfile]


def load_client_side(cfg: NodeSpec, federation: Federation) -> ClientSide:
    """The clients' model(s), adapters and encoder for ``federation``, as ``cfg`` (a node's spec) says."""
    client_models = None
    if cfg.model.variants:  # model-heterogeneous clients: one model per architecture, the shared adapter
        total = len(federation.clients) + len(federation.held_out)
        client_models = ClientModels(
            cfg.model, cfg.adapter, cfg.data, cfg.compute, cfg.federation.seed, total, federation.num_labels
        )
        bundle, adapters = client_models.bundles[0], client_models.adapters[0]
    else:
        bundle = load_base_model(cfg.model, federation.num_labels, cfg.adapter.init_seed, cfg.compute)
        adapters = LoraAdapters(bundle.model, cfg.adapter, cfg.model.task)
    profiles = client_profiles(cfg.resources, cfg.adapter.rank, len(federation.clients), cfg.federation.seed)
    for profile in sorted(set(profiles)):
        adapters.activate(profile)  # refuses ranks above a module's min(d, k) before any work
    canonical = {p: adapters.canonical(p) for p in set(profiles)}  # one object per rank type, not per client
    profiles = [canonical[p] for p in profiles]
    encoder = (
        client_models.encoders[0]
        if client_models is not None
        else Encoder.for_data(bundle.tokenizer, cfg.model.task, cfg.data)
    )
    return ClientSide(bundle, adapters, encoder, client_models, profiles)


def build_client_node(cfg: NodeSpec) -> ClientNode:
    """The clients of a node's spec in this process, without any server part (Flower ClientApps, workers;
    each prepares its process first: :func:`fedlora.preflight.prepare_node`)."""
    federation = federate(cfg.data, cfg.partition, cfg.federation, cfg.model.task, cfg.held_out_clients)
    side = load_client_side(cfg, federation)
    return ClientNode(
        cfg.client,
        cfg.federation.seed,
        federation.clients,
        side.adapters,
        side.encoder,
        side.client_models,
        resolve_precision(cfg.compute.precision, cfg.compute.device),
        cfg.federation.rounds,
    )


def wrap_strategy(strategy: Strategy, cfg: ExperimentConfig, federation: Federation) -> Strategy:
    """The cross-cutting features the config turns on, around the method: a robust aggregation rule
    (``federation.aggregation``), update-norm screening (its limits are in ``federation``; not under secure aggregation, which hides the replies), DP-SGD
    with ``privacy.enabled`` (``unit: example``) or DP-FedAvg (``unit: client``) outermost."""
    fed = cfg.federation
    wrapped: Strategy = strategy
    if fed.aggregation != "mean":
        wrapped = RobustAggregation(wrapped, fed.aggregation, fed.trim_fraction)
    if not fed.secure_aggregation:  # the screens need each reply; secure aggregation shows only the average
        wrapped = UpdateNormScreen(wrapped, fed)
    if cfg.privacy.dp_sgd:
        wrapped = DifferentialPrivacy(
            wrapped, PrivacyLedger.plan_for(cfg.privacy, cfg.client, fed.rounds, federation.clients)
        )
    if cfg.privacy.client_level:
        clients = len(federation.clients)
        plan = ClientNoisePlan.plan_for(cfg.privacy, clients_per_round(fed, clients), clients, fed.rounds)
        wrapped = ClientLevelPrivacy(wrapped, cfg.privacy, plan, clip_on_clients=fed.secure_aggregation)
    return wrapped


def assemble_simulation(
    cfg: ExperimentConfig, for_training: bool = True, federation: Federation | None = None
) -> tuple[Simulation, ModelBundle]:
    """For a preflighted ``cfg`` (:func:`fedlora.preflight.check_experiment`): load data (cheap, fails fast on bad files; or use the given
    ``federation``), then the model, adapters and the wrapped strategy."""
    federation = federation if federation is not None else build_federation(cfg)
    if for_training:
        clients_per_round(
            cfg.federation, len(federation.clients)
        )  # fails before the model loads if sampling cannot work
    side = load_client_side(NodeSpec.of(cfg), federation)
    adapters, client_models = side.adapters, side.client_models
    strategy = build_strategy(cfg.strategy)
    if strategy.personal_models and client_models is None:
        raise ConfigError(
            f"strategy {strategy.name} trains each client's own model: give model.variants "
            "(e.g. model.variants='[{num_layers: 6}, {num_layers: 2}]'), one in-memory model per architecture"
        )
    initial = strategy.initial_adapter(adapters, largest_profile(side.profiles))
    if strategy.trains_full_model:  # the pretrained weights themselves are what the clients tune
        initial = to_cpu(dict(adapters.base_parameters()))
    if client_models is not None:
        initial = strategy.initial_personal_state(client_models)
    setup = ServerSetup(
        initial_state=initial,
        client_profiles=dict(enumerate(side.profiles)),
        lora_alpha=adapters.cfg.alpha,
        rank_stabilized=adapters.cfg.use_rslora,
        lora_scale=adapters.cfg.scale,
        seed=cfg.federation.seed,
        client_sizes={c.client_id: c.size("train") for c in federation.clients},
        device=str(server_device(cfg)),
    )
    if for_training:
        strategy = wrap_strategy(strategy, cfg, federation)  # refuses DP budgets it cannot meet
        if cfg.privacy.dp_sgd:
            for profile in sorted(set(side.profiles)):  # refuses layers Opacus cannot handle, naming them
                adapters.activate(profile)
                assert adapters.model is not None  # activating a profile builds the model
                check_dp_support(adapters.model)
    node = ClientNode(
        cfg.client,
        cfg.federation.seed,
        federation.clients,
        adapters,
        side.encoder,
        client_models,
        resolve_precision(cfg.compute.precision, cfg.compute.device),
        cfg.federation.rounds,
    )
    server = Server(strategy, setup)
    sim = Simulation(RoundPlan.of(cfg), federation, adapters, side.encoder, server, client_models, node)
    return sim, side.bundle
