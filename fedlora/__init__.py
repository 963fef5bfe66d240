"""fedlora: federated fine-tuning of language models with low-rank adapters.

Layout (one job per package): ``config`` (validated experiment config), ``data`` (sources, partitioners,
prompt encoding), ``models`` (base models, GGUF conversion), ``adapters`` (LoRA via PEFT, state format),
``client`` (local training), ``strategies`` (server methods), ``engine`` (simulation, checkpoints),
``eval`` (metrics), ``tracking`` (metrics.jsonl, progress, plots), ``cli``.
"""

__version__ = "0.1.0"
