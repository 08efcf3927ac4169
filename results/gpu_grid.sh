#!/usr/bin/env bash
# The results grid on one GPU, most wanted runs first, until a budget of seconds is spent. Run from the repository
# root; every finished run is a line of $OUT/grid.jsonl. Called again with that file copied to results/grid.jsonl,
# it skips those runs and goes on (results/sweep.py), so the grid can take several calls and sessions.
#
#   bash results/gpu_grid.sh [BUDGET_S]          # default 560: inside a 600 s call, with room to copy the files
#   PHASES="2 3" bash results/gpu_grid.sh 300    # only those phases, in that order
#
# Phases (each skips what is done; a phase cut short by the budget goes on in the next call):
#   0  all five tasks, cheapest first: lora and dynlora, seeds 0, 1, 2: the comparison that matters most, when
#      time is short
#   1  SST-2: lora, dynlora, peft-lora, peft-adalora; seeds 0, 1, 2; each method's default lr
#   2  SST-2: full, dynlora-nogate, dynlora-norealloc; the same
#   3  RTE, MRPC, STS-B, CoLA (cheapest first): all seven methods, the same
#   4  all five tasks: the lr chosen on holdout from sweep.LRS (the default-lr runs above count as one of the three)
#   5  seeds 3 and 4 at the chosen lr
# Every run holds out 500 training examples (sweep.py --holdout); the tables: python results/table.py FILE --split dev
#
# What it needs there: python3 with torch (CUDA), transformers, peft, tiktoken; the gguf package, or its wheel in
# .whl/ (carried); the GGUF at $DYNLORA_GGUF (default $HOME/w/SmolLM2-135M-Instruct.Q4_1.gguf); GLUE at $GLUE_DIR
# (default: the first of .glue, shared/glue, ../shared/glue that exists; carry .glue with the five tasks' train.tsv
# and dev.tsv, 7.3 MB). Optional:
#   PER_GPU   runs at once (default 2): one loads and compiles on the CPU while the other trains. Runs training
#             at once share the GPU worse than one after another (earlier sweeps, several runs a GPU: an SST-2
#             lora epoch 97 s in results/glue.jsonl, alone 23 s in README Speed): 1 once compilation is cached
#   COMPILE   --compile (default) or --no-compile: compiling costs 40 to 120 s for the first run of each method
#             on a fresh machine, a few seconds from the cache after that
#   .inductor a carried folder of torch.compile's cache (from an earlier call's inductor.tgz) is used and refilled
#   MIN_LEFT  seconds a run needs before it may start (default 90)
#   TINY=1    every run at tiny size on CPU (sweep.py --tiny): a dry run of this script, OUT=/tmp/o TINY=1 MIN_LEFT=5
# What comes back in $OUT: grid.jsonl (every run, old and new), gpu_grid.log (this output), logs.tgz (each run's
# log), inductor.tgz (the compile cache, if under 15 MiB: unpack it into .inductor and carry that next time).
set -uo pipefail
BUDGET=${1:-560}
T0=$(date +%s)
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_grid.log") 2>&1
left() { echo $((BUDGET - ($(date +%s) - T0))); }

GGUF=${DYNLORA_GGUF:-$HOME/w/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ -z "${GLUE_DIR:-}" ]; then
    for d in .glue shared/glue ../shared/glue; do [ -f "$d/SST-2/train.tsv" ] && GLUE_DIR=$d && break; done
fi
[ -f "$GGUF" ] || { echo "error: no GGUF at $GGUF (set DYNLORA_GGUF)"; exit 2; }
[ -f "${GLUE_DIR:-}/SST-2/train.tsv" ] || { echo "error: no GLUE folder (set GLUE_DIR, or carry .glue)"; exit 2; }
if ! python3 -c "import gguf" 2>/dev/null; then  # no network there: the wheel travels in .whl/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/gguf*.whl || { echo "error: gguf is not installed and .whl/gguf*.whl did not install"; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$([ -d .inductor ] && echo "$PWD/.inductor" \
    || echo /tmp/inductor)}
[ -d .tk ] && export TIKTOKEN_CACHE_DIR=${TIKTOKEN_CACHE_DIR:-$PWD/.tk}  # not read by data.py; harmless
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?') | ${GPU:-no GPU} | budget ${BUDGET} s | GGUF $GGUF" \
    "| GLUE $GLUE_DIR"
python3 -c "import torch, transformers, peft, gguf, tiktoken; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| peft', peft.__version__, '| cuda', torch.cuda.is_available())" || exit 2

STATE=$OUT/grid.jsonl  # written run by run: even a call cut off at its limit brings back what finished
[ -f results/grid.jsonl ] && cp results/grid.jsonl "$STATE"
touch "$STATE"
echo "$(grep -c . "$STATE") runs already in results/grid.jsonl"

ALL=lora,dynlora,peft-lora,peft-adalora,full,dynlora-nogate,dynlora-norealloc
sweep() {  # the phase's runs, within what is left of the budget
    local l; l=$(left)
    if [ "$l" -lt "${MIN_LEFT:-90}" ]; then echo "phase skipped: ${l} s left"; return; fi
    python3 results/sweep.py --init "$GGUF" --data-dir "$GLUE_DIR" --out "$STATE" --logs runs/grid \
        --holdout 500 --budget-s "$l" --min-left "${MIN_LEFT:-90}" --per-gpu "${PER_GPU:-2}" \
        "${COMPILE:---compile}" ${TINY:+--tiny} "$@"
}
for phase in ${PHASES:-1 2 3 4 5}; do  # phase 0 only when asked: phase 1 holds its runs
    echo "== phase $phase, $(left) s left"
    case $phase in
        0) sweep --tasks rte,mrpc,stsb,cola,sst2 --configs lora,dynlora --seeds 0,1,2 --no-lr-select ;;
        1) sweep --tasks sst2 --configs lora,dynlora,peft-lora,peft-adalora --seeds 0,1,2 --no-lr-select ;;
        2) sweep --tasks sst2 --configs full,dynlora-nogate,dynlora-norealloc --seeds 0,1,2 --no-lr-select ;;
        3) sweep --tasks rte,mrpc,stsb,cola --configs $ALL --seeds 0,1,2 --no-lr-select ;;
        4) sweep --tasks sst2,rte,mrpc,stsb,cola --configs $ALL --seeds 0,1,2 --lr-select ;;
        5) sweep --tasks sst2,rte,mrpc,stsb,cola --configs $ALL --seeds 0,1,2,3,4 --lr-select ;;
        *) echo "error: no phase $phase"; exit 2 ;;
    esac
done
tar czf "$OUT/logs.tgz" -C runs grid 2>/dev/null
if [ -d "$TORCHINDUCTOR_CACHE_DIR" ] && [ -z "${TINY:-}" ]; then
    tar czf "$OUT/inductor.tgz" -C "$TORCHINDUCTOR_CACHE_DIR" . 2>/dev/null
    if [ "$(stat -c %s "$OUT/inductor.tgz")" -gt $((15 << 20)) ]; then
        echo "inductor.tgz left out: $(du -h "$OUT/inductor.tgz" | cut -f1), over what comes back"
        rm "$OUT/inductor.tgz"
    fi
fi
echo "$(grep -c . "$STATE") runs in $STATE after $(($(date +%s) - T0)) s; copy it to results/grid.jsonl for the" \
    "next call"
python3 results/table.py "$STATE" --split dev 2>&1 | head -40
