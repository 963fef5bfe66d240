# Prepare what the GPU machine (no network, 64 MiB of files, its own torch/transformers) needs to run
# benchmarks/gpu_run.sh: wheels of the Python packages its image lacks (.whl/), SmolLM2's architecture
# without its weights, and the default experiment's data plus the compute tests' data as JSONL (.gpu/).
# Run from the repository root on a machine with `make dev` and `make models` done.
set -euo pipefail
PY=.venv/bin/python
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 datasets==4.8.5 \
  dill==0.4.1 multiprocess==0.70.19 flwr-datasets==0.6.1 peft==0.21.2 opacus==1.6.0 trl==1.16.0 accelerate==1.16.0
mkdir -p .gpu/smollm2-arch
cp ~/.cache/fedlora/models/smollm2-135m-instruct/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/smollm2-arch/
HF_HUB_OFFLINE=1 $PY - <<'PY'
import json
from fedlora.config import load_config
from fedlora.config.loader import config_from_dict
from fedlora.data.federation import build_federation

def export(cfg, path):
    with open(path, "w") as f:
        for c in build_federation(cfg).clients:
            for split in ("train", "eval", "test"):
                for e in c.split(split):
                    row = {"instruction": e.instruction, "input": e.input, "output": e.output, "category": c.name}
                    f.write(json.dumps(row) + "\n")

export(load_config(None, []), ".gpu/default-data.jsonl")
tasks = {"tasks": ["gcd", "lcm", "chain_sum", "basic_arithmetic"], "examples_per_task": 16}
export(config_from_dict({"data": tasks}), ".gpu/test-data.jsonl")
PY
echo "now: device run with carry [.whl, .gpu]: bash benchmarks/gpu_run.sh tests | bench | peers | roofline"
