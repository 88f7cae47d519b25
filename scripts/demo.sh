#!/usr/bin/env bash
# The README's first command (`make demo`): start the service on the embedded default (a SQLite
# file, a local artifact folder, one worker process) on loopback, run a small pruning job
# through the REST API with the client commands, download its verified artifacts, stop the
# service. Interrupted, it resumes: the same Idempotency-Key gives the same job back, and the job
# continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEMO_DIR=${DEMO_DIR:-runs/demo}
PORT=${DEMO_PORT:-8765}
mp="$VENV/bin/metaprune"

mkdir -p "$DEMO_DIR"
export METAPRUNE_DATABASE_URL="sqlite:///$DEMO_DIR/metaprune.db"
export METAPRUNE_ARTIFACT_DIR="$DEMO_DIR/jobs-data"
export METAPRUNE_SERVER="http://127.0.0.1:$PORT"

echo "demo: starting the service on $METAPRUNE_SERVER (log: $DEMO_DIR/serve.log)"
"$mp" serve --host 127.0.0.1 --port "$PORT" --workers 1 --quiet >"$DEMO_DIR/serve.log" 2>&1 &
server=$!
stop() { kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

"$VENV/bin/python" - "$METAPRUNE_SERVER/readyz" "$server" <<'EOF'
import os, sys, time, httpx
url, pid = sys.argv[1], int(sys.argv[2])
for _ in range(300):
    try:
        if httpx.get(url, timeout=1).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("demo: the service did not start; see the log")
    time.sleep(0.2)
sys.exit("demo: the service did not become ready in 60 s; see the log")
EOF

# MobileNetV1 (0.25x) on Fashion-MNIST, pruned to 30% of its MACs; the uniform baseline too
job=$("$mp" submit --arch mobilenet_v1 --width-mult 0.25 --dataset fashion-mnist \
      --macs-ratio 0.3 --preset quick --baseline --idempotency-key demo-mobilenet-v1)
echo "demo: job $job (GET $METAPRUNE_SERVER/v1/jobs/$job)"
"$mp" watch "$job"
"$mp" download "$job" --dest "$DEMO_DIR/model"

"$VENV/bin/python" - "$DEMO_DIR/model" <<'EOF'
import json, sys, warnings, torch
warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notice
folder = sys.argv[1]
report = json.load(open(f"{folder}/report.json"))
for name in ("metapruning", "uniform"):
    r = report[name]
    acc = r.get("test_accuracy")
    print(f"{name:>12}: {r['macs'] / 1e6:6.2f} M MACs  {r['params'] / 1e3:7.1f} k params  "
          f"test top-1 {'-' if acc is None else f'{100 * acc:.2f}%'}")
model = torch.jit.load(f"{folder}/model.ts")  # plain PyTorch
print(f"demo: {folder}/model.ts loads with torch.jit.load; logits shape",
      tuple(model(torch.zeros(1, 1, 28, 28)).shape))
EOF
