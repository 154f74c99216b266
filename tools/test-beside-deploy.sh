#!/usr/bin/env bash
# `make test` while another `fedlora deploy` runs on the same machine (issue: tests find their own processes by
# process group or work folder, never by name; every launch has its own Flower home, ports and locks).
# The deployment beside it trains a tiny random Llama for many rounds; after the suite it must still be running
# (or have finished cleanly), and a SIGTERM must end it in one line with none of its processes left.
set -euo pipefail
cd "$(dirname "$0")/.."
make setup
PY=.venv/bin/python
work=$(mktemp -d /tmp/fedlora-beside.XXXXXX)
"$PY" -c "import sys; sys.path.insert(0, '.'); from tests.tiny_folder import save_tiny_model; save_tiny_model('$work/model')"
HF_HUB_OFFLINE=1 "$PY" -m fedlora.cli deploy configs/tiny.yaml federation.rounds=100000 train.local_steps=1 eval.every=50 \
  model.path="$work/model" output.dir="$work/run" > "$work/deploy.log" 2>&1 &
deploy=$!
echo "fedlora deploy beside the suite: pid $deploy, run $work/run, log $work/deploy.log"
until grep -q '"round": 1' "$work/run/metrics.jsonl" 2>/dev/null; do
  kill -0 $deploy 2>/dev/null || { echo "the deployment beside the suite ended before round 1:"; tail -20 "$work/deploy.log"; exit 1; }
  sleep 2
done
status=0
make test || status=$?
if ! kill -0 $deploy 2>/dev/null; then
  echo "the deployment beside the suite ended during it:"; tail -20 "$work/deploy.log"; exit 1
fi
rounds=$(grep -c '"round"' "$work/run/metrics.jsonl")
kill -TERM $deploy; wait $deploy || true
left=$(ps -eo pid,args | grep -F "$work" | grep -v grep || true)
echo "the deployment beside the suite ran $rounds rounds; its last lines:"; tail -2 "$work/deploy.log"
[ -z "$left" ] || { echo "processes of the deployment left after SIGTERM:"; echo "$left"; exit 1; }
exit $status
