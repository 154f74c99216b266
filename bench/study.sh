#!/usr/bin/env bash
# The results study of docs/RESULTS.md: `fedlora compare` runs in streams side by side (one
# torch thread each), logs and folders under runs/study/. Finished runs are reused, so a rerun
# resumes, and `tables` only rebuilds the tables and plots.
#   bash bench/study.sh a | b | c | d   # the first streams
#   bash bench/study.sh e               # control over 3 seeds, SmolLM2 seeds 1-2, the longer study
#   bash bench/study.sh f               # the methods of 2025 (fedsa, fedex, rolora, florist), same splits and seeds
#   bash bench/study.sh tables
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
F=".venv/bin/fedlora"
CLS=(configs/classification.yaml federation.rounds=3 train.local_steps=3 eval.max_examples=40)
LM=(configs/tiny.yaml federation.rounds=2)
LONG=(configs/classification.yaml)  # the committed config: 5 rounds of 5 steps, 200 test examples
mkdir -p runs/study
case "${1:-}" in
  a) $F compare "${CLS[@]}" --methods flora,fedplora --seeds 3 --output runs/study/cls-hetero
     $F compare "${LM[@]}" --methods flora,fedplora --seeds 1 --output runs/study/lm-hetero ;;
  b) $F compare "${CLS[@]}" --methods fedit,zeropad --seeds 3 --output runs/study/cls-hetero
     $F compare "${LM[@]}" --methods fedit,zeropad --seeds 1 --output runs/study/lm-hetero ;;
  d) $F compare "${LM[@]}" --methods flora,zeropad,fedplora,fedit --seeds 1 --output runs/study/lm-hetero ;;
  c) $F compare "${CLS[@]}" --methods hetlora,flexlora,ffa,full,centralized,local --seeds 3 --output runs/study/cls-hetero-others
     $F compare "${CLS[@]}" lora.rank=8 --methods flora,fedit --seeds 1 --output runs/study/cls-rank8 ;;
  e) $F compare "${CLS[@]}" lora.rank=8 --methods flora,fedit,fedplora,hetlora,flexlora --seeds 3 --output runs/study/cls-rank8
     $F compare "${LM[@]}" --methods flora,fedplora,fedit,zeropad --seeds 3 --output runs/study/lm-hetero
     $F compare "${LONG[@]}" --methods flora,fedplora,fedit,zeropad,hetlora,flexlora,ffa --seeds 3 --output runs/study/cls-long ;;
  f) $F compare "${LM[@]}" --methods fedsa,fedex,rolora,florist,flora --seeds 3 --output runs/study/lm-2025
     $F compare "${LONG[@]}" --methods fedsa,fedex,rolora,florist --seeds 3 --output runs/study/cls-long-2025 ;;
  tables)
     $F compare "${CLS[@]}" --methods flora,fedplora,fedit,zeropad --seeds 3 --output runs/study/cls-hetero --tables-only
     $F compare "${CLS[@]}" --methods hetlora,flexlora,ffa,full,centralized,local --seeds 3 --output runs/study/cls-hetero-others --tables-only
     $F compare "${CLS[@]}" lora.rank=8 --methods flora,fedit,fedplora,hetlora,flexlora --seeds 3 --output runs/study/cls-rank8 --tables-only
     $F compare "${LM[@]}" --methods flora,fedplora,fedit,zeropad --seeds 3 --output runs/study/lm-hetero --tables-only
     $F compare "${LONG[@]}" --methods flora,fedplora,fedit,zeropad,hetlora,flexlora,ffa --seeds 3 --output runs/study/cls-long --tables-only ;;
  *) echo "usage: bash bench/study.sh a|b|c|d|e|f|tables" >&2; exit 2 ;;
esac
