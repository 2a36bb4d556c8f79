#!/usr/bin/env bash
# A Slurm job array that edits one manifest in 8 shards, one GPU each, judged by a vLLM
# server (judges/vllm-qwen2.5-vl-72b.toml; set its api_base to the server's address).
# Submit:   sbatch docs/slurm-batch.sh
# Resume:   sbatch it again: finished items are skipped, failed ones retried.
# Merge:    icedit-scale merge --out runs/edits-merged runs/edits/shard-*
#SBATCH --job-name=icedit-batch
#SBATCH --array=0-7
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --output=runs/edits/slurm-%A_%a.log
set -euo pipefail
# --shard auto reads SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_MIN / SLURM_ARRAY_TASK_COUNT.
exec icedit-scale batch \
  --manifest data/edits.jsonl \
  --out "runs/edits/shard-${SLURM_ARRAY_TASK_ID}" \
  --shard auto \
  --queue 2 \
  --seeds 8 --probe-steps 4 --keep 2 --steps 50 \
  --model-dir /models/FLUX.1-Fill-dev --lora /models/icedit/pytorch_lora_weights.safetensors \
  --device cuda --keep-text-encoders \
  --judge judges/vllm-qwen2.5-vl-72b.toml
