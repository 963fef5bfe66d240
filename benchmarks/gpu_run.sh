# The GPU checks and benchmarks (benchmarks/gpu.md), on the lent GPU machine from the repository root, after
# benchmarks/gpu_prepare.sh made .whl/ and .gpu/ here: `bash benchmarks/gpu_run.sh tests`, `... bench`, `... peers` or `... roofline`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 FEDLORA_TEST_DATA_JSON=$PWD/.gpu/test-data.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cores', __import__('os').cpu_count())" | tee -a $OUT/gpu.txt
python3 - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
config = AutoConfig.from_pretrained(".gpu/smollm2-arch")
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained("/tmp/smollm2-arch")
AutoTokenizer.from_pretrained(".gpu/smollm2-arch").save_pretrained("/tmp/smollm2-arch")
print("SmolLM2-135M architecture, random weights:", sum(p.numel() for p in model.parameters()), "parameters")
PY
set -o pipefail
case "$1" in
tests)
  timeout 540 python3 -m pytest -q -p no:cacheprovider tests/unit/test_compute.py 2>&1 | tee $OUT/gpu_tests.log | tail -40 ;;
bench)
  timeout 560 python3 benchmarks/throughput.py --device cuda --clients 8 --rounds 3 \
    --variants per-client,batched,per-client-bf16,batched-bf16 \
    -o model.name=/tmp/smollm2-arch -o data.source=json -o data.path=$PWD/.gpu/default-data.jsonl 2>&1 | tee $OUT/gpu_throughput.log ;;
peers)
  timeout 560 python3 benchmarks/peers.py --rounds 2 \
    -o model.name=/tmp/smollm2-arch -o data.source=json -o data.path=$PWD/.gpu/default-data.jsonl 2>&1 | tee $OUT/gpu_peers.log ;;
roofline)
  timeout 560 python3 benchmarks/roofline.py --device cuda --model /tmp/smollm2-arch --compile 2>&1 | tee $OUT/gpu_roofline.log ;;
esac
