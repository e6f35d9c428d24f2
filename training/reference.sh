#!/usr/bin/env bash
# Train the whole reference cascade in one run directory: tokenizer, latents, then base, SR1 and SR2 (side by side
# on a GPU: they are independent once the latents exist; one after another on a CPU), then assemble the cascade.
#
#   training/reference.sh RUN_DIR CASCADE.safetensors
#
# Settings (environment): PYTHON (python3), PRESET (tiny), DEVICE (cuda if available), TOKENIZER_MINUTES,
# DENOISER_MINUTES, CLIPS (latent dataset size), TOKENIZER_BATCH, BASE_BATCH, SR_BATCH, WORKERS, INFERENCE_STEPS, GUIDANCE,
# PARALLEL (1: denoisers side by side; default 1 where nvidia-smi exists). Every stage resumes from RUN_DIR, so
# running the script again continues training where the minutes ran out.
set -euo pipefail
run=${1:?usage: training/reference.sh RUN_DIR CASCADE.safetensors}
cascade=${2:?usage: training/reference.sh RUN_DIR CASCADE.safetensors}
py=${PYTHON:-python3}
preset=(--preset "${PRESET:-tiny}")
common=(--out "$run" --workers "${WORKERS:-8}" "${preset[@]}")
[[ -n "${DEVICE:-}" ]] && common+=(--device "$DEVICE")

$py -m training tokenizer "${common[@]}" --minutes "${TOKENIZER_MINUTES:-120}" --batch "${TOKENIZER_BATCH:-8}"
[[ -f "$run/latents.npy" ]] || $py -m training latents "${common[@]}" --count "${CLIPS:-400}"
parallel=${PARALLEL:-$(command -v nvidia-smi > /dev/null && echo 1 || echo 0)}
pids=()
status=0
for stage in base sr1 sr2; do
    batch=${SR_BATCH:-8}
    [[ $stage == base ]] && batch=${BASE_BATCH:-16}
    $py -m training "$stage" "${common[@]}" --minutes "${DENOISER_MINUTES:-120}" --batch "$batch" \
        > "$run/$stage.log" 2>&1 &
    if [[ $parallel == 1 ]]; then pids+=($!); else wait "$!" || status=1; fi
done
for pid in "${pids[@]+"${pids[@]}"}"; do wait "$pid" || status=1; done
tail -n 3 "$run"/base.log "$run"/sr1.log "$run"/sr2.log
[[ $status == 0 ]] || { echo "a denoiser failed; see $run/*.log" >&2; exit 1; }
$py -m training cascade "${common[@]}" --to "$cascade" --inference-steps "${INFERENCE_STEPS:-25}" \
    --guidance "${GUIDANCE:-2}"
