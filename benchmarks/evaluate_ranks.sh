#!/usr/bin/env bash
# DoRA vs LoRA at ranks 4, 8 and 16 on the embedded toy-world model with the 3D-icon set, then
# the evaluation report (README "Evaluation"). About 8 minutes on 2 CPU cores.
#
#   bash benchmarks/evaluate_ranks.sh [extra evaluate flags, e.g. --dino_model none --clip_model none]
set -euo pipefail
cd "$(dirname "$0")/.."
for rank in 4 8 16; do
  for method in dora lora; do
    dreambooth-dora train --config "train_configs/quickstart_tiny_icon_${method}.yaml" --rank "$rank" \
      --lora_alpha "$rank" --checkpointing_steps 100 --report_to none --overwrite_output_dir \
      --output_dir "outputs/ranks/toy_icon_${method}_r${rank}"
  done
done
# --overwrite_output_dir / --overwrite: a rerun replaces this script's own earlier runs and report
dreambooth-dora evaluate --config train_configs/evaluate/toy_3d_icon_ranks.yaml --overwrite "$@"
