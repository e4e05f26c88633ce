#!/usr/bin/env bash
# The headline figures on one H100 / H200 in at most 8 minutes, written to ONE JSON file.
#
#   bash benchmarks/device_suite.sh                  # on the GPU: ${OUT:-.}/device_suite.json
#   bash benchmarks/device_suite.sh results.json     # or the path given
#   bash benchmarks/device_suite.sh --tiny           # CPU smoke run: each benchmark's --tiny
#
# Parts, each under its own `timeout` so that one slow part cannot eat the others' time:
#   decode_bf16   benchmarks/decode.py, QwQ-32B shape, bf16, batch 1 / 16 / 64 (split layer loop; an
#                 engine of that many decode slots per batch over its paged KV cache)
#   decode_int8   the same with int8 weight-only weights (--quantize int8)
#   prefill_8k    benchmarks/prefill.py, QwQ-32B shape, one 8,192-token prompt: tokens/s and MFU
#   grpo_7b       benchmarks/train_step.py, the GRPO update on the Qwen2.5-7B shape (as many layers
#                 as fit, --layers auto): step time, MFU, HFU; cuDNN checked against xla in the run
#   cudnn_check   benchmarks/prefill.py --attention cudnn on the 7B shape at 2,048 tokens (scanned
#                 layers: one layer body to compile): its check_vs_xla, the max |logit difference|
#                 and argmax against the xla reference
#   serving       benchmarks/serving.py on the Qwen2.5-1.5B shape (random weights): our engine's
#                 continuous and static policies and HF generate, 32 skewed requests (prompts median
#                 128 / max 1024 tokens, outputs 32 / 256) and 2 groups of 16 samples, all arriving
#                 at once, 32 decode slots: tokens/s, TTFT, inter-token latency, continuous/static
#                 and continuous/hf; skipped when the script does not exist
# Ours only (--impl ours) but for serving: the HF peers double the time; run the scripts alone for
# the ratios.
# Progress per part goes to stderr, a markdown table of the figures to stdout. Run from anywhere;
# needs nothing installed beyond the GPU image (PYTHONPATH is set to the repository).
set -u -o pipefail

usage() { echo "usage: bash benchmarks/device_suite.sh [--tiny] [OUT.json]" >&2; }
TINY=0
OUT_JSON=""
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=1 ;;
    -h|--help) usage; awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2; exit 0 ;;
    -*) echo "error: unknown option $arg; use --tiny for the CPU smoke run, or give the output path" >&2; exit 2 ;;
    *) if [ -n "$OUT_JSON" ]; then
         echo "error: more than one output path ($OUT_JSON, $arg); give one" >&2; exit 2
       fi
       OUT_JSON="$arg" ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_JSON="${OUT_JSON:-${OUT:-.}/device_suite.json}"
case "$OUT_JSON" in /*) ;; *) OUT_JSON="$PWD/$OUT_JSON" ;; esac
mkdir -p "$(dirname "$OUT_JSON")" || { echo "error: cannot create the directory of $OUT_JSON" >&2; exit 2; }
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || { echo "error: no $PY on PATH; set PYTHON=/path/to/python" >&2; exit 2; }
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Compiled programs persist across parts and reruns (JAX reads this variable itself).
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${QWQ_JAX_XLA_CACHE:-$HOME/.cache/qwq-jax/xla}}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# name|seconds allowed (full run)|arguments (full)|arguments (--tiny: the script's CPU smoke settings)
# The limits add up to 470 s (7 min 50 s), compilation included; each part starts its own process.
# They are estimates (no GPU was at hand when this was written): a part that overruns is recorded
# as "timeout" and the others still run; a second run reuses the compiled programs (the cache above).
DECODE="--impl ours --batch 1 16 64 --prompt-len 128 --new-tokens 64 --layer-loop split --no-inspect-hlo"
SERVING="--preset qwen2.5-1.5b --impl ours hf --arrival all --n 1 16 --requests 32 --groups 2 --prompt-len 128 1024 --output-len 32 256 --max-num-seqs 32 --occupancy-tokens 64"
# --tiny runs each script's own CPU smoke settings (HF peers included): tests/test_benchmarks_smoke.py
# runs this suite once and checks every part's records, so these are the benchmarks' smoke runs too.
PARTS=(
  "decode_bf16|100|decode.py --preset qwq-32b $DECODE|decode.py --tiny --batch 4"
  "decode_int8|80|decode.py --preset qwq-32b $DECODE --quantize int8|decode.py --tiny --quantize int8 --layer-loop split --impl ours --batch 4"
  "prefill_8k|65|prefill.py --preset qwq-32b --impl ours --seq 8192 --check-max-seq 0 --iters 3|prefill.py --tiny --attention blockwise"
  "grpo_7b|100|train_step.py --preset qwen2.5-7b --impl ours --iters 2|train_step.py --tiny --attention blockwise"
  "cudnn_check|35|prefill.py --preset qwen2.5-7b --impl ours --seq 2048 --attention cudnn --layer-loop scan --iters 1|prefill.py --tiny --impl ours --seq 32 --attention blockwise --iters 1"
  "serving|90|serving.py $SERVING|serving.py --tiny --http"
)
# A CPU has no cuDNN: --tiny checks the blockwise backend against xla through the same code
# (grpo_7b's own check runs with the default backend, cuDNN, on the GPU). --tiny allows each part
# TINY_LIMIT seconds (default 240: a loaded 2-core machine).
TINY_LIMIT="${TINY_LIMIT:-240}"

run_part() {  # name limit args...: runs one benchmark, records its JSON lines, exit code and time
  local name="$1" limit="$2"; shift 2
  local script="benchmarks/$1"; shift
  local dir="$WORK/$name"
  mkdir -p "$dir"
  echo "$script $*" > "$dir/command"
  echo "$limit" > "$dir/limit"
  if [ ! -f "$script" ]; then
    echo "skipped" > "$dir/status"
    echo "[$name] skipped: $script does not exist yet" >&2
    return
  fi
  echo "[$name] running: $script $* (at most ${limit}s)" >&2
  local t0 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$PY" "$script" "$@" > "$dir/stdout" 2> "$dir/stderr"
  rc=$?
  echo "$rc" > "$dir/rc"
  "$PY" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$t0" "$(date +%s.%N)" > "$dir/seconds"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "timeout" > "$dir/status"
    echo "[$name] TIMEOUT after ${limit}s" >&2
  elif [ "$rc" -ne 0 ]; then
    echo "failed" > "$dir/status"
    echo "[$name] FAILED (exit $rc): $(tail -n 1 "$dir/stderr")" >&2
  else
    echo "ok" > "$dir/status"
    echo "[$name] done in $(cat "$dir/seconds")s" >&2
  fi
}

START=$(date +%s)
NAMES=()
for spec in "${PARTS[@]}"; do
  IFS='|' read -r name full_limit full_args tiny_args <<< "$spec"
  NAMES+=("$name")
  # shellcheck disable=SC2086
  if [ "$TINY" -eq 1 ]; then run_part "$name" "$TINY_LIMIT" $tiny_args; else run_part "$name" "$full_limit" $full_args; fi
done
echo "[suite] all parts finished in $(( $(date +%s) - START ))s" >&2

"$PY" - "$WORK" "$OUT_JSON" "$TINY" "$(( $(date +%s) - START ))" "${NAMES[@]}" <<'EOF'
"""Assemble the parts' JSON lines into one file and print a markdown table of the figures."""
import datetime
import json
import os
import subprocess
import sys

work, out_path, tiny, total_s, names = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5:]


def read(part, name, default=None):
    path = os.path.join(work, part, name)
    return open(path).read().strip() if os.path.exists(path) else default


def records(part):
    out = []
    for line in (read(part, "stdout", "") or "").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def rows(recs):  # our measured rows (no ratio or summary lines)
    return [r for r in recs if r.get("impl") == "qwq-jax" and "ratio" not in r and not r.get("summary")]


def figures(part, recs):
    """The headline numbers of a part, by name."""
    figs = {}
    if part.startswith("decode"):
        for r in rows(recs):
            key = f"b{r['batch']}_p{r['prompt_len']}"
            figs[f"{key}_tokens_per_s"] = r.get("decode_tokens_per_s")
            if r.get("fraction_of_roofline") is not None:
                figs[f"{key}_fraction_of_roofline"] = r["fraction_of_roofline"]
    elif part == "prefill_8k":
        for r in rows(recs):
            figs[f"seq{r['seq']}_tokens_per_s"] = r.get("tokens_per_s")
            figs[f"seq{r['seq']}_mfu"] = r.get("mfu")
    elif part == "grpo_7b":
        for r in rows(recs):
            figs.update(layers=r.get("layers"), step_s=r.get("step_s"), tokens_per_s=r.get("tokens_per_s"),
                        mfu=r.get("mfu"), hfu=r.get("hfu"))
            check = r.get("check_vs_xla") or {}
            if check:
                figs["max_abs_logprob_diff_vs_xla"] = check.get("max_abs_logprob_diff_vs_xla")
    elif part == "cudnn_check":
        for r in rows(recs):
            check = r.get("check_vs_xla")
            if check:
                figs.update(seq=check.get("seq"), max_abs_logit_diff_vs_xla=check.get("max_abs_logit_diff_vs_xla"),
                            same_argmax=check.get("same_argmax"))
            figs["attention_resolved"] = r.get("attention_resolved")
            figs["attention_fallbacks"] = len(r.get("attention_fallbacks") or [])
    else:  # serving: whatever numbers its rows carry
        for r in recs:
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    figs[k] = v
    return figs


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None


parts, device = {}, None
for name in names:
    status = read(name, "status", "missing")
    recs = records(name)
    device = device or next((r.get("device") for r in recs if r.get("device")), None)
    part = {"status": status, "command": read(name, "command"), "limit_s": int(read(name, "limit", "0"))}
    if status == "skipped":
        part["reason"] = f"{part['command'].split()[0]} does not exist yet"
    else:
        part.update(seconds=float(read(name, "seconds", "0")), exit_code=int(read(name, "rc", "-1")),
                    figures=figures(name, recs), records=recs)
        errors = [r["error"] for r in recs if "error" in r]
        if status != "ok" or errors:
            part["stderr_tail"] = (read(name, "stderr", "") or "").splitlines()[-5:]
        if errors:
            part["errors"] = errors
    parts[name] = part

try:
    import jax
    jax_version = jax.__version__
except Exception:
    jax_version = None
result = {"suite": "device_suite", "mode": "tiny" if tiny else "full",
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "device": device, "git_commit": git_commit(), "jax": jax_version, "total_s": total_s, "parts": parts}
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)


def fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


print(f"device suite ({result['mode']}), {result['date']}, device {device}, jax {jax_version}, {total_s} s\n")
print("| part | status | seconds | figures |")
print("| --- | --- | --- | --- |")
for name, part in parts.items():
    figs = ", ".join(f"{k} {fmt(v)}" for k, v in part.get("figures", {}).items()) or part.get("reason", "")
    print(f"| {name} | {part['status']} | {part.get('seconds', '-')} | {figs} |")
print(f"\nwritten: {out_path}")
bad = [n for n, p in parts.items() if p["status"] not in ("ok", "skipped") or p.get("errors")]
print(f"[suite] wrote {out_path}" + (f"; not measured: {', '.join(bad)}" if bad else ""), file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
