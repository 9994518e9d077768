#!/usr/bin/env bash
# Every results table of the paper as commands: pretrain each row's model, finetune it on the table's
# tasks (the paper's B.2 protocol: ESM-1b in the loop on real features), collect everything into one
# table with the paper's row under each of ours, and run the analyses (Table 1, t-SNE, attention).
#
#   bash ablations.sh                          # full scale (GPU): features/pretrain, features/ec, features/go
#   QUICK=1 bash ablations.sh                  # demo scale on the synthetic features/demo (2 CPU cores: ~6 minutes;
#                                              #   SEEDS="0 1" QUICK=1: 11 minutes)
#   DRY_RUN=1 bash ablations.sh                # print every command, run nothing
#   GPUS="0 1 2 3" bash ablations.sh           # independent runs side by side, one per GPU
#   LAUNCH="torchrun --nproc_per_node 4" bash ablations.sh   # each run on 4 GPUs (DDP; global batch as the paper)
#   ONLY="amma paired-15" bash ablations.sh    # some rows (names below)
#   SEEDS="0 1 2" bash ablations.sh            # every finetuning once per seed (mean +- SD in the table)
#   SEEDS="0 1 2" SEED_PRETRAIN=1 bash ablations.sh   # ... and every pretraining once per seed too
#
# Rows (runs/<name>/checkpoint.pt, runs/<name>/<task>/results.json):
#   Table 2 (pretrained on $PRETRAIN, the paper's 120k; EC, GO-MF, GO-CC, GO-BP):
#     amma           asymmetric decoders, alpha 1 2 2 (AMMA)
#     symmetric      eq. 13 (AMMA-symmetric)
#     contrastive    B.9 (AMMA-contrastive)
#     esm-1b         ESM-1b with the same two-layer head, no AMMA (finetune.py --baseline esm; no pretraining)
#   Table 3 (EC, GO-MF): amma continued from its epoch 10 to epoch 15, the StepLR schedule carrying on
#     paired-15      on the paired set again (120k / 0k): the same as a 15-epoch run by construction
#     unpaired-15    on the unpaired sets, eq. 12 (120k / 50k: $SEQSTR and $SEQFUNC, 25k each)
#   Table 4 (a random $SUBSET_N-protein subset of $PRETRAIN, the paper's 22k; EC, GO-MF):
#     alpha-1-1-1  alpha-1-2-2  alpha-2-1-1  alpha-2-1-2  alpha-2-2-1     Dirichlet (seq, str, func)
#   Table 6 (the same subset; EC, GO-MF): noaux (eq. 17); its AMMA row is alpha-1-2-2
#
# Seeds: without SEEDS each finetuning runs once (--seed 0) into runs/<name>/<task>; with SEEDS="0 1 2"
# once per seed into runs/<name>/<task>/seed-<s> (--seed s: head init, batch order, dropout); with
# SEED_PRETRAIN=1 as well every pretraining once per seed into runs/<name>/seed-<s> (amma.py --seed s),
# finetuned with the same seed into runs/<name>/seed-<s>/<task>. analyze.py --collect shows mean +- SD
# over the seeds and n in every cell and marks with '!' a mean more than 2 SD from the paper's number.
# Every command resumes (--resume): running the script again after a stop continues where it was.
# It stops at the first failing command (GPUS mode: after the phase, listing the failures), exit status 1.
# Environment: PYTHON (.venv/bin/python when it exists, else python3), LAUNCH, GPUS, RUNS (runs),
# PRETRAIN (features/pretrain), SEQSTR / SEQFUNC (features/seqstr, features/seqfunc), SUBSET_N (22000;
# 0 = all of $PRETRAIN), EPOCHS (10), EPOCHS_T3 (15), SEED (0; the subset's and the analyses' seed, and
# the pretrainings' without SEED_PRETRAIN), SEEDS (''), SEED_PRETRAIN (0), PT_ARGS / FT_ARGS (extra flags for
# amma.py --pretrain / finetune.py), FT_FEATURES (finetuning feature set; default: finetune.py's
# features/ec and features/go, or $PRETRAIN with QUICK=1), ANALYZE (1; 0 = skip the analyses).
set -euo pipefail

KIT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $KIT/.venv/bin/python ]]; then PYTHON=$KIT/.venv/bin/python; else PYTHON=python3; fi
fi
QUICK=${QUICK:-0}
DRY_RUN=${DRY_RUN:-0}
SEED=${SEED:-0}
SEEDS=${SEEDS:-}
SEED_PRETRAIN=${SEED_PRETRAIN:-0}
ANALYZE=${ANALYZE:-1}
ONLY=${ONLY:-}
GPUS=${GPUS:-}
read -ra LAUNCH_CMD <<< "${LAUNCH:-$PYTHON}"
if [[ -n $GPUS && -n ${LAUNCH:-} ]]; then
    echo "error: GPUS runs independent single-GPU jobs side by side; LAUNCH runs each job on several GPUs: pick one" >&2
    exit 2
fi
read -ra SEED_LIST <<< "$SEEDS"
for s in "${SEED_LIST[@]}"; do
    [[ $s =~ ^[0-9]+$ ]] || { echo "error: SEEDS must be whole numbers separated by spaces, got '$SEEDS'" >&2; exit 2; }
done
if [[ $SEED_PRETRAIN == 1 && ${#SEED_LIST[@]} == 0 ]]; then
    echo "error: SEED_PRETRAIN=1 pretrains once per seed of SEEDS: set SEEDS too (e.g. SEEDS=\"0 1 2\")" >&2
    exit 2
fi
PT_SEEDS=("$SEED")
[[ $SEED_PRETRAIN != 1 ]] || PT_SEEDS=("${SEED_LIST[@]}")
if [[ $DRY_RUN != 1 ]] && ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "error: $PYTHON cannot import torch: set the kit up first (python3 -m venv .venv &&" \
         ".venv/bin/pip install -r requirements.txt), or point PYTHON at a Python that has it" >&2
    exit 2
fi

if [[ $QUICK == 1 ]]; then
    # Demo scale: the synthetic demo (240 proteins, labels for all four tasks) for every set, a small model
    # and demo learning rates (the paper's 1e-5 would not move a model in a few dozen steps).
    RUNS=${RUNS:-runs/quick}
    PRETRAIN=${PRETRAIN:-features/demo}
    SEQSTR=${SEQSTR:-$PRETRAIN}          # the demo's proteins read as seq+str only ...
    SEQFUNC=${SEQFUNC:-$PRETRAIN}        # ... and as seq+func only
    SUBSET_N=${SUBSET_N:-0}
    EPOCHS=${EPOCHS:-3}
    EPOCHS_T3=${EPOCHS_T3:-4}
    FT_FEATURES=${FT_FEATURES:-$PRETRAIN}
    PT_ARGS=${PT_ARGS:---D 64 --n-layers 2 --n-heads 4 --dec-layers 1 --M 48 --batch-size 8 --lr 1e-3 --step-size 2 --num-workers 0}
    FT_ARGS=${FT_ARGS:---epochs 3 --batch-size 8 --lr 2e-4 --lr-head 2e-3 --optimizer adamw --num-workers 0 --eval-batch-size 64}
    AN_ARGS="--tsne-n 120"
else
    RUNS=${RUNS:-runs}
    PRETRAIN=${PRETRAIN:-features/pretrain}
    SEQSTR=${SEQSTR:-features/seqstr}
    SEQFUNC=${SEQFUNC:-features/seqfunc}
    SUBSET_N=${SUBSET_N:-22000}
    EPOCHS=${EPOCHS:-10}
    EPOCHS_T3=${EPOCHS_T3:-15}
    FT_FEATURES=${FT_FEATURES:-}
    PT_ARGS=${PT_ARGS:-}
    FT_ARGS=${FT_ARGS:-}
    AN_ARGS=""
fi
read -ra PT <<< "$PT_ARGS"
read -ra FT <<< "$FT_ARGS"
read -ra AN <<< "$AN_ARGS"
FT_SET=()
[[ -z $FT_FEATURES ]] || FT_SET=(--features "$FT_FEATURES")

wanted() {   # is this row selected by ONLY (empty = all)?
    [[ -z $ONLY || " $ONLY " == *" $1 "* ]]
}

# ---- data -----------------------------------------------------------------------------------------
if [[ $QUICK == 1 && ! -f $PRETRAIN/manifest.tsv ]]; then
    echo "+ $PYTHON $KIT/demo.py --out $PRETRAIN"
    [[ $DRY_RUN == 1 ]] || "$PYTHON" "$KIT/demo.py" --out "$PRETRAIN"
fi
if [[ $DRY_RUN != 1 && ! -f $PRETRAIN/manifest.tsv ]]; then
    echo "error: no feature set at $PRETRAIN (extract_features.py --source alphafold ...; see REPRODUCE.md), or QUICK=1" >&2
    exit 2
fi
UNPAIRED=1
if [[ $DRY_RUN != 1 ]] && { [[ ! -f $SEQSTR/manifest.tsv ]] || [[ ! -f $SEQFUNC/manifest.tsv ]]; }; then
    echo "note: no unpaired sets at $SEQSTR and $SEQFUNC (extract_features.py --source alphafold --pick ...):" \
         "Table 3's unpaired-15 row is left out" >&2
    UNPAIRED=0
fi

# The ablation set: a random SUBSET_N-protein subset of $PRETRAIN (Tables 4 and 6 used 22k of 120k). It
# shares the feature files through symbolic links; only manifest.tsv is new.
ABLATION=$PRETRAIN
if [[ $SUBSET_N != 0 ]]; then
    ABLATION=${PRETRAIN%/}-sub$SUBSET_N
    if [[ ! -f $ABLATION/manifest.tsv ]]; then
        echo "+ subset of $SUBSET_N proteins of $PRETRAIN -> $ABLATION (seed $SEED)"
        [[ $DRY_RUN == 1 ]] || "$PYTHON" - "$PRETRAIN" "$ABLATION" "$SUBSET_N" "$SEED" <<'EOF'
import os, random, shutil, sys
from pathlib import Path
src, dst, n, seed = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
header, *rows = [l for l in (src / "manifest.tsv").read_text().splitlines() if l.strip()]
if n >= len(rows):
    sys.exit(f"error: {src} has {len(rows)} proteins, not more than SUBSET_N={n}; use SUBSET_N=0")
keep = sorted(random.Random(seed).sample(range(len(rows)), n))
dst.mkdir(parents=True, exist_ok=True)
for m in ("seq", "str", "func"):
    if (src / m).is_dir() and not (dst / m).exists():
        os.symlink(src / m, dst / m, target_is_directory=True)
if (src / "info.json").exists():
    shutil.copy(src / "info.json", dst / "info.json")
tmp = dst / "manifest.tsv.tmp"
tmp.write_text("\n".join([header] + [rows[i] for i in keep]) + "\n")
os.replace(tmp, dst / "manifest.tsv")
print(f"wrote {dst}/manifest.tsv: {n} of {len(rows)} proteins")
EOF
    fi
fi

# ---- the jobs, in three phases (a phase needs the one before it) ----------------------------------
# phase 1: pretrainings; phase 2: Table 3's continuations of amma and the finetunings of phase 1;
# phase 3: the finetunings of the continuations.
JOBS=() NAMES=() PHASES=()
job() {   # job PHASE NAME COMMAND...
    local phase=$1 name=$2 cmd
    shift 2
    printf -v cmd '%q ' "$@"
    JOBS+=("$cmd") NAMES+=("$name") PHASES+=("$phase")
}

finetunings() {   # finetunings PHASE NAME DIR TASK finetune.py flags...: into DIR/TASK, or DIR/TASK/seed-<s> per seed
    local phase=$1 name=$2 dir=$3 task=$4 s
    shift 4
    if (( ${#SEED_LIST[@]} == 0 )); then
        job "$phase" "$name-$task" "${LAUNCH_CMD[@]}" "$KIT/finetune.py" --task "$task" "$@" --out "$dir/$task" \
            --resume "${FT_SET[@]}" "${FT[@]}"
        return 0
    fi
    for s in "${SEED_LIST[@]}"; do
        job "$phase" "$name-$task-seed$s" "${LAUNCH_CMD[@]}" "$KIT/finetune.py" --task "$task" "$@" --seed "$s" \
            --out "$dir/$task/seed-$s" --resume "${FT_SET[@]}" "${FT[@]}"
    done
}

pretrain() {   # pretrain PHASE NAME "TASKS" amma.py flags... (@SEEDDIR@ in a flag: the pretraining seed's folder)
    local phase=$1 name=$2 tasks=$3 task ps sub dir
    shift 3
    wanted "$name" || return 0
    for ps in "${PT_SEEDS[@]}"; do
        sub=""
        [[ $SEED_PRETRAIN != 1 ]] || sub="/seed-$ps"
        dir=$RUNS/$name$sub
        job "$phase" "$name${sub/\//-}" "${LAUNCH_CMD[@]}" "$KIT/amma.py" --pretrain --out "$dir" --seed "$ps" \
            --resume "${@//@SEEDDIR@/$sub}" "${PT[@]}"
        for task in $tasks; do
            if [[ $SEED_PRETRAIN == 1 ]]; then    # the pretraining's own seed, into runs/<name>/seed-<s>/<task>
                job $((phase + 1)) "$name-seed$ps-$task" "${LAUNCH_CMD[@]}" "$KIT/finetune.py" --task "$task" \
                    --ckpt "$dir/checkpoint.pt" --seed "$ps" --resume "${FT_SET[@]}" "${FT[@]}"
            else
                finetunings $((phase + 1)) "$name" "$dir" "$task" --ckpt "$dir/checkpoint.pt"
            fi
        done
    done
}

ALL_TASKS="ec go-mf go-cc go-bp"
SUB_TASKS="ec go-mf"
# Table 2: the three pretraining strategies on the full set
pretrain 1 amma        "$ALL_TASKS" --features "$PRETRAIN" --epochs "$EPOCHS" --variant asymmetric --alpha 1 2 2
pretrain 1 symmetric   "$ALL_TASKS" --features "$PRETRAIN" --epochs "$EPOCHS" --variant symmetric --alpha 1 2 2
pretrain 1 contrastive "$ALL_TASKS" --features "$PRETRAIN" --epochs "$EPOCHS" --variant contrastive
# Table 2's ESM-1b row: no pretraining, ESM-1b + the same head finetuned with B.2's settings (no AMMA)
if wanted esm-1b; then
    for task in $ALL_TASKS; do
        if [[ $SEED_PRETRAIN == 1 ]]; then
            for s in "${SEED_LIST[@]}"; do
                job 1 "esm-1b-seed$s-$task" "${LAUNCH_CMD[@]}" "$KIT/finetune.py" --task "$task" --baseline esm \
                    --seed "$s" --out "$RUNS/esm-1b/seed-$s/$task" --resume "${FT_SET[@]}" "${FT[@]}"
            done
        else
            finetunings 1 esm-1b "$RUNS/esm-1b" "$task" --baseline esm
        fi
    done
fi
# Table 3: amma's run carried on to epoch $EPOCHS_T3 on paired data again, or on the unpaired sets (eq. 12)
pretrain 2 paired-15   "$SUB_TASKS" --continue-from "$RUNS/amma@SEEDDIR@/checkpoint.pt" --epochs "$EPOCHS_T3" \
    --features "$PRETRAIN" --variant asymmetric --alpha 1 2 2
if [[ $UNPAIRED == 1 ]]; then
    pretrain 2 unpaired-15 "$SUB_TASKS" --continue-from "$RUNS/amma@SEEDDIR@/checkpoint.pt" --epochs "$EPOCHS_T3" \
        --features "" --unpaired-seqstr "$SEQSTR" --unpaired-seqfunc "$SEQFUNC" --variant asymmetric --alpha 1 2 2
fi
# Table 4: Dirichlet alphas (seq, str, func) on the subset
for alpha in "1 1 1" "1 2 2" "2 1 1" "2 1 2" "2 2 1"; do
    read -ra a <<< "$alpha"
    pretrain 1 "alpha-${a[0]}-${a[1]}-${a[2]}" "$SUB_TASKS" --features "$ABLATION" --epochs "$EPOCHS" \
        --variant asymmetric --alpha "${a[@]}"
done
# Table 6: without the auxiliary decoder inputs, on the subset
pretrain 1 noaux "$SUB_TASKS" --features "$ABLATION" --epochs "$EPOCHS" --variant no-aux --alpha 1 2 2

# ---- run them -------------------------------------------------------------------------------------
pool() {   # pool INDEX...: the jobs side by side, each on the next free GPU of $GPUS
    local -a gpus idx=("$@")
    read -ra gpus <<< "$GPUS"
    command -v flock > /dev/null || { echo "error: GPUS needs flock (util-linux)" >&2; exit 2; }
    mkdir -p "$RUNS/logs"
    local queue failed
    queue=$(mktemp) failed=$(mktemp)
    echo 0 > "$queue"
    for gpu in "${gpus[@]}"; do
        (
            while true; do
                k=$(flock "$queue" sh -c 'n=$(cat "$1"); echo $((n + 1)) > "$1"; echo "$n"' _ "$queue")
                (( k < ${#idx[@]} )) || break
                i=${idx[k]}
                echo "[GPU $gpu] + ${JOBS[i]}> $RUNS/logs/${NAMES[i]}.log"
                if ! CUDA_VISIBLE_DEVICES=$gpu eval "${JOBS[i]}" > "$RUNS/logs/${NAMES[i]}.log" 2>&1; then
                    echo "${NAMES[i]}: ${JOBS[i]}(log: $RUNS/logs/${NAMES[i]}.log)" >> "$failed"
                    echo "[GPU $gpu] FAILED: ${NAMES[i]} (see $RUNS/logs/${NAMES[i]}.log)"
                fi
            done
        ) &
    done
    wait
    if [[ -s $failed ]]; then
        echo "error: these jobs failed (fix and run the script again: finished runs are kept):" >&2
        cat "$failed" >&2
        exit 1
    fi
    rm -f "$queue" "$failed"
}

for phase in 1 2 3; do
    idx=()
    for i in "${!JOBS[@]}"; do [[ ${PHASES[i]} == "$phase" ]] && idx+=("$i"); done
    (( ${#idx[@]} )) || continue
    if [[ $DRY_RUN == 1 ]]; then
        for i in "${idx[@]}"; do echo "+ ${JOBS[i]}"; done
    elif [[ -n $GPUS ]]; then
        pool "${idx[@]}"
    else
        for i in "${idx[@]}"; do
            echo "+ ${JOBS[i]}"
            eval "${JOBS[i]}"
        done
    fi
done

# ---- collect and analyse --------------------------------------------------------------------------
echo "+ $PYTHON $KIT/analyze.py --collect $RUNS"
[[ $DRY_RUN == 1 ]] || "$PYTHON" "$KIT/analyze.py" --collect "$RUNS"
if [[ $ANALYZE == 1 ]] && wanted amma; then
    CON=()
    FIRST=$RUNS/amma                               # the analyses: the first pretraining seed's models
    [[ $SEED_PRETRAIN != 1 ]] || FIRST=$RUNS/amma/seed-${PT_SEEDS[0]}
    CFIRST=${FIRST/\/amma/\/contrastive}
    if [[ -f $CFIRST/checkpoint.pt || ($DRY_RUN == 1 && -z $ONLY) ]]; then
        CON=(--contrastive-ckpt "$CFIRST/checkpoint.pt")
    fi
    echo "+ $PYTHON $KIT/analyze.py --ckpt $FIRST/checkpoint.pt ${CON[*]} --features $PRETRAIN --seed $SEED ${AN[*]}"
    [[ $DRY_RUN == 1 ]] || "$PYTHON" "$KIT/analyze.py" --ckpt "$FIRST/checkpoint.pt" "${CON[@]}" \
        --features "$PRETRAIN" --seed "$SEED" "${AN[@]}"
fi
