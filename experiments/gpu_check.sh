#!/usr/bin/env bash
# GPU check of the benchmark CLI: the RunLoRA paper's three headline configurations and the shape
# matrix (real decoder-layer widths, issue 25) in bf16 on one GPU (sized for an H200, 139 GiB),
# within about 9 minutes in all (540 s: the budget was 480 s before the matrix).
#
#   experiments/gpu_check.sh OUT_DIR          # run from the repository root
#
#   llama_60m  b=64 r=8   s=1024  peft, runlora (default criterion), peft+inductor, floor
#   llama_60m  b=64 r=8   s=1024  lora_dropout 0.05: runlora, peft+inductor (sparse
#                                 dropout; its table gives the peak memory)
#   llama_250m b=58 r=128 s=1024  peft, runlora, peft+inductor
#   llama_1.3b b=24 r=512 s=1024  peft, runlora, peft+inductor
#   shapes                        experiments/shapes_exp.py: one decoder layer of Llama-3.2-1B,
#                                 Qwen2.5-0.5B, Llama-3-8B; b=4 s=512 and s=2048 (8B: s=512),
#                                 r=16, p 0 and 0.05; peft+inductor, runlora, floor; 3 s of rounds
#                                 (at least 8) a point. Its own budget (its share) decides how many
#                                 points run, smallest N first; the table lists those left out.
#
# Trimmed to fit: 10 s of timed rounds per configuration (the seed used 20 s per implementation),
# and the floor only on 60m (an Inductor compile of a 24-layer training step may take a minute or
# more). Each run gets a share of the budget (15/12/15/20/38 %; what a run leaves passes to the next):
# the CLI's --time_limit skips variants, in the order above, whose compile would not fit, and a
# hard timeout 30 s later guards the rest. Set GPU_CHECK_FLOOR=1 to add the floor to 250m and 1.3b
# (about two minutes more), GPU_CHECK_BUDGET_S to change the 540 s budget, GPU_CHECK_RUNS to run
# only some configurations (names as below, e.g. "llama_60m_b64_r8" or "shapes"; the budget is then
# shared among those alone), GPU_CHECK_VARIANTS to replace the variants of every run (e.g.
# "peft+inductor runlora" for the paired ratio alone, on a short lease) and GPU_CHECK_SHAPES
# to run only some points of the matrix (shapes_exp's --only patterns, e.g. "llama3.2-1b_*").
#
# Writes to OUT_DIR (few files, so that a remote runner brings all of them back; the committed
# results live in experiments/results/gpu/):
#   tables.md    every configuration's table and the matrix's, with the environment and any run
#                that failed
#   results.csv  every configuration's CSV rows, one header (model_exp's columns)
#   shapes.md, shapes.csv  the shape matrix's summary (shapes_exp's columns)
#   runs.tar.gz  per configuration and per matrix point: the .csv, .md, .png and the full log
#
# Assumes: a Python (first of $PYTHON, python3, .venv/bin/python whose torch sees CUDA) with a
# CUDA build of torch >= 2.11 (tested: 2.11 to 2.13) and transformers>=5, peft>=0.21, matplotlib,
# tqdm, networkx and setuptools installed; no network is needed. The script installs this
# checkout into that Python, editable, with `pip install --no-deps --no-build-isolation -e .`:
# nothing else is installed or changed, the torch there included. Inductor caches compiled
# kernels under /tmp (torch's default).
set -euo pipefail

OUT=${1:?usage: experiments/gpu_check.sh OUT_DIR (run from the repository root)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
MIN_RUN_TIME=${GPU_CHECK_MIN_RUN_TIME:-10}
TARGETS="q_proj v_proj k_proj o_proj up_proj down_proj gate_proj"
LARGE_VARIANTS="peft runlora peft+inductor"
[[ ${GPU_CHECK_FLOOR:-0} == 1 ]] && LARGE_VARIANTS="$LARGE_VARIANTS floor"
ONLY=${GPU_CHECK_RUNS:-}

if [[ ! -f experiments/model_exp.py ]]; then
  echo "gpu_check: run me from the repository root (experiments/model_exp.py not found)" >&2
  exit 2
fi

# name | share of the budget, % | arguments (of model_exp.py; of shapes_exp.py for "shapes")
ALL_RUNS=(
  "llama_60m_b64_r8|15|-m configs/llama_60m.json --n_batch 64 -r 8 --variants ${GPU_CHECK_VARIANTS:-peft runlora peft+inductor floor}"
  "llama_60m_b64_r8_d005|12|-m configs/llama_60m.json --n_batch 64 -r 8 -d 0.05 --variants ${GPU_CHECK_VARIANTS:-runlora peft+inductor}"
  "llama_250m_b58_r128|15|-m configs/llama_250m.json --n_batch 58 -r 128 --variants ${GPU_CHECK_VARIANTS:-$LARGE_VARIANTS}"
  "llama_1.3b_b24_r512|20|-m configs/llama_1.3b.json --n_batch 24 -r 512 --variants ${GPU_CHECK_VARIANTS:-$LARGE_VARIANTS}"
  "shapes|38|--dtype bf16 --n_batch 4 --seq_lens 512 2048 --ranks 16 --dropouts 0 0.05 --min_rounds 8 --min_run_time 3 --variants ${GPU_CHECK_VARIANTS:-peft+inductor runlora floor}${GPU_CHECK_SHAPES:+ --only $GPU_CHECK_SHAPES}"
)
RUNS=()
for run in "${ALL_RUNS[@]}"; do
  [[ -z $ONLY || " $ONLY " == *" ${run%%|*} "* ]] && RUNS+=("$run")
done
if ((${#RUNS[@]} == 0)); then
  echo "gpu_check: GPU_CHECK_RUNS='$ONLY' names no configuration; valid: llama_60m_b64_r8" \
       "llama_60m_b64_r8_d005 llama_250m_b58_r128 llama_1.3b_b24_r512 shapes" >&2
  exit 2
fi

PY=""
NEEDS="import sys, torch, transformers, peft, matplotlib, tqdm, networkx"
for candidate in ${PYTHON:-} python3 .venv/bin/python; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c "$NEEDS; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PY=$("$candidate" -c "import sys; print(sys.executable)")  # absolute: usable from any folder
    break
  fi
done
if [[ -z $PY ]]; then
  echo "gpu_check: found no Python (tried ${PYTHON:-} python3 .venv/bin/python) whose torch sees" \
       "CUDA and that has transformers, peft, matplotlib, tqdm and networkx" >&2
  exit 2
fi
# runlora-fx into that Python, as a user adds it beside the torch they have: editable, no
# dependency resolved (they are there), no build environment fetched (no network here)
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
   ! (cd / && "$PY" -c "import runlora_fx.passes.find_sites") >/dev/null; then
  echo "gpu_check: could not install this checkout into $PY (pip install --no-deps" \
       "--no-build-isolation -e . needs setuptools>=68 there)" >&2
  exit 2
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  "$PY" -c "import torch, transformers, peft; print(f'- {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
  echo "- bf16, seq_len 1024, all 7 target modules, alpha 8, dropout 0 (_d005: 0.05), min_run_time ${MIN_RUN_TIME} s, budget ${BUDGET_S} s; the shape matrix: its own table below"
  echo
} >"$WORK/tables.md"

deadline=$(($(date +%s) + BUDGET_S))
later_shares=0  # shares kept for the runs after the current one, of total_shares in all
for run in "${RUNS[@]}"; do
  IFS='|' read -r _ share _ <<<"$run"
  later_shares=$((later_shares + share))
done
total_shares=$later_shares

for run in "${RUNS[@]}"; do
  IFS='|' read -r name share args <<<"$run"
  later_shares=$((later_shares - share))
  limit=$((deadline - $(date +%s) - later_shares * BUDGET_S / total_shares))
  if ((limit < 60)); then
    echo "- $name: skipped, only ${limit} s of the budget left" | tee -a "$WORK/tables.md"
    continue
  fi
  echo "gpu_check: $name (timeout ${limit} s)"
  if [[ $name == shapes ]]; then
    # shapes_exp stops starting points when its budget is spent and rewrites its summary after
    # every point, so a run cut short by the timeout still leaves the points it measured
    set -f  # GPU_CHECK_SHAPES's patterns reach shapes_exp as they are, not as file names
    # shellcheck disable=SC2086  # word splitting of $args is intended
    timeout --kill-after=10 "$limit" "$PY" experiments/shapes_exp.py $args --device cuda \
      --budget $((limit - 30)) -o "$WORK/shapes" >"$WORK/$name.log" 2>&1 && status=0 || status=$?
    set +f
    if [[ -f $WORK/shapes/shapes_summary.md ]]; then
      sed 's/^# /### /' "$WORK/shapes/shapes_summary.md" >>"$WORK/tables.md"
      cp "$WORK/shapes/shapes_summary.md" "$WORK/shapes.md"
      cp "$WORK/shapes/shapes_summary.csv" "$WORK/shapes.csv"
    fi
    if ((status != 0)); then
      { echo "### $name: exit $status (1: a point failed; 124/137: timed out after ${limit} s);" \
             "last lines of its log:"; echo '```'; tail -n 15 "$WORK/$name.log"; echo '```';
        echo; } >>"$WORK/tables.md"
    fi
    echo >>"$WORK/tables.md"
    continue
  fi
  # shellcheck disable=SC2086  # word splitting of $args and $TARGETS is intended
  if timeout --kill-after=10 "$limit" "$PY" experiments/model_exp.py $args \
      --dtype bf16 --seq_len 1024 --target_modules $TARGETS \
      --min_run_time "$MIN_RUN_TIME" --min_rounds 5 --device cuda --time_limit $((limit - 30)) \
      -o "$WORK/$name" >"$WORK/$name.log" 2>&1; then
    cat "$WORK/$name.md" >>"$WORK/tables.md"
    if [[ -f $WORK/results.csv ]]; then
      tail -n +2 "$WORK/$name.csv" >>"$WORK/results.csv"
    else
      cp "$WORK/$name.csv" "$WORK/results.csv"
    fi
  else
    status=$?
    reason="exit $status"
    ((status == 124 || status == 137)) && reason="timed out after ${limit} s"
    { echo "### $name: FAILED ($reason); last lines of its log:"; echo '```';
      tail -n 15 "$WORK/$name.log" | tr '\r' '\n' | tail -n 15; echo '```'; echo; } >>"$WORK/tables.md"
  fi
  echo >>"$WORK/tables.md"
done

cp "$WORK/tables.md" "$OUT/tables.md"
for file in results.csv shapes.md shapes.csv; do
  [[ -f $WORK/$file ]] && cp "$WORK/$file" "$OUT/$file"
done
tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude=tables.md --exclude=results.csv \
  --exclude=shapes.md --exclude=shapes.csv .
cat "$OUT/tables.md"
echo "gpu_check: wrote $(ls "$OUT" | tr "\n" " ")to $OUT"
