"""The record a process that only runs clients is built from (a worker process, a Flower ClientApp)."""

from __future__ import annotations

from pydantic import Field

from fedlora.config.schema import (
    AdapterConfig,
    ClientConfig,
    ComputeConfig,
    DataConfig,
    ExperimentConfig,
    FederationConfig,
    ModelConfig,
    PartitionConfig,
    ResourcesConfig,
    Section,
)


def effective_adapter(cfg: ExperimentConfig) -> AdapterConfig:
    """``cfg.adapter`` as the method trains with it (:meth:`Strategy.adapter_config`: e.g. the reference LoRA
    scale of Fed-SB or FLoRA), for the server and every node alike."""
    from fedlora.strategies.registry import strategy_class, validate_strategy_options

    return strategy_class(cfg.strategy.name).adapter_config(
        cfg.adapter, validate_strategy_options(cfg.strategy)
    )


class NodeSpec(Section):
    """What the clients of an experiment are made of, and nothing of the server's business (strategy,
    privacy plan, faults, evaluation, outputs): the plugins to import, the base model and adapter, the data
    and how it is split into clients (``federation``: how many and the seed; ``held_out_clients``: how many
    never train), the clients' ranks (``resources``), local training (``client``) and ``compute``.

    It crosses to worker processes as JSON; every node that builds the same spec holds the same clients."""

    plugins: list[str] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    #: ``eval.held_out_clients``: clients split off before ids are given (they shift the training ids)
    held_out_clients: int = Field(0, ge=0)
    client: ClientConfig = Field(default_factory=ClientConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @classmethod
    def of(cls, cfg: ExperimentConfig) -> NodeSpec:
        """The clients of ``cfg``, with the adapter section its method trains with (:func:`effective_adapter`)."""
        return cls(
            plugins=list(cfg.plugins),
            model=cfg.model,
            adapter=effective_adapter(cfg),
            data=cfg.data,
            partition=cfg.partition,
            federation=cfg.federation,
            held_out_clients=cfg.eval.held_out_clients,
            client=cfg.client,
            compute=cfg.compute,
            resources=cfg.resources,
        )
