#!/usr/bin/env bash
# On the GPU machine (the device tool): put the GGUF together, run the tests that need CUDA, and time bench.py.
# Run from the repository root; everything it prints goes to $OUT/gpu_check.log as well.
#
#   bash results/gpu_check.sh part      # 1st call, carrying .w1 (the GGUF's first 50 MB): kept in $HOME/w
#   bash results/gpu_check.sh join      # 2nd call while the machine is warm, carrying .w2: the GGUF, checked
#   bash results/gpu_check.sh tests     # tests/ that need CUDA (CUDA graphs against eager, through reallocations)
#   bash results/gpu_check.sh bench     # bench.py at the GPT-2 shape, 32 x 128, compiled, every method of ours,
#                                       # reallocating every 125 steps: SST-2's default schedule (2,089 steps)
#   bash results/gpu_check.sh epoch     # the SST-2 epoch with SmolLM2 at the defaults, then the fast recipe;
#                                       # the first run's history.json comes back for plot_ranks.py
#
# The halves come from: split -b 50000000 SmolLM2-135M-Instruct.Q4_1.gguf; mv xaa .w1/; mv xab .w2/
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
W=$HOME/w
GGUF=$W/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for step in "$@"; do
    echo "== $step"
    case $step in
        part) cat .w1/* > "$W/part1" && ls -l "$W/part1" ;;
        join) cat "$W/part1" .w2/* > "$GGUF" && echo "$SHA  $GGUF" | sha256sum -c - && rm "$W/part1" ;;
        tests) timeout 300 python3 -m pytest -q -rs tests/test_cuda_graphs.py ;;
        bench) timeout 420 python3 bench.py --model gpt2 --batch-size 32 --seq-len 128 --compile yes --no-peft \
                   --methods lora,dynlora,dynlora-nogate,dynlora-norealloc,full --steps 250 --realloc-every 125 \
                   | tee "$OUT/bench.txt" ;;
        epoch) G=${GLUE_DIR:-.glue}
               timeout 300 python3 train.py --task sst2 --init "$GGUF" --data-dir "$G" --out /tmp/epoch \
                   > "$OUT/epoch.log" 2>&1; tail -3 "$OUT/epoch.log"; cp /tmp/epoch/history.json "$OUT/history_sst2.json"
               timeout 240 python3 train.py --task sst2 --init "$GGUF" --data-dir "$G" --batch-size 64 --lr 7e-4 \
                   --group-by-length 50 > "$OUT/epoch_fast.log" 2>&1; tail -1 "$OUT/epoch_fast.log" ;;
        *) echo "error: no step $step"; exit 2 ;;
    esac
done
