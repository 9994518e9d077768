#!/usr/bin/env bash
# The paper's ablations as ready commands: pretrain each variant and Dirichlet alpha, finetune each
# checkpoint, collect all results into one table, and run the analyses (Table 1, t-SNE, attention).
#
#   bash ablations.sh                          # full scale (GPU): features/pretrain, features/ec, features/go
#   QUICK=1 bash ablations.sh                  # demo scale: synthetic features/demo, tiny model, a few steps (CPU minutes)
#   DRY_RUN=1 bash ablations.sh                # print the commands only
#   ONLY="amma contrastive" bash ablations.sh  # some of the runs (names below)
#   LAUNCH="torchrun --nproc_per_node 4" bash ablations.sh   # several GPUs (amma.py and finetune.py run under DDP)
#
# Runs: runs/<name>/checkpoint.pt, runs/<name>/<task>/results.json (QUICK=1: under runs/quick/)
#   Table 2, pretrained on $PRETRAIN (paper: the 120k set), finetuned on EC, GO-MF, GO-CC, GO-BP:
#     amma          asymmetric decoders, alpha 1 2 2 (the paper's AMMA)
#     symmetric     eq. 13 (AMMA-symmetric)
#     contrastive   B.9 (AMMA-contrastive)
#   Tables 4 and 6, pretrained on a random 22k subset of $PRETRAIN (as the paper), finetuned on EC and GO-MF:
#     alpha-1-1-1  alpha-1-2-2  alpha-2-1-1  alpha-2-1-2     Dirichlet (alpha_seq, alpha_str, alpha_func), Table 4
#     noaux         eq. 17 (AMMA-w/o auxiliary), Table 6; its AMMA row is alpha-1-2-2
# Then: python analyze.py --collect runs/   -> runs/results_table.md and .json (rows = runs, columns =
# EC / GO-MF / GO-CC / GO-BP Fmax and AUPR, the paper's values below), and the analyses of runs/amma.
#
# Every step resumes (--resume): re-running the script after a stop continues where it was.
# Environment: PYTHON (python), LAUNCH ($PYTHON), RUNS (runs), PRETRAIN (features/pretrain),
# SUBSET_N (22000; 0 = the ablations use all of $PRETRAIN), SEED (0), PT_ARGS / FT_ARGS (extra flags
# for amma.py --pretrain / finetune.py), ANALYZE (1; 0 = skip the analyses).
set -euo pipefail

PYTHON=${PYTHON:-python}
read -ra LAUNCH_CMD <<< "${LAUNCH:-$PYTHON}"
QUICK=${QUICK:-0}
DRY_RUN=${DRY_RUN:-0}
SEED=${SEED:-0}
ANALYZE=${ANALYZE:-1}
ONLY=${ONLY:-}

if [[ $QUICK == 1 ]]; then
    # Demo scale: the synthetic demo feature set (it has labels for all four tasks), a small model, few steps.
    RUNS=${RUNS:-runs/quick}
    PRETRAIN=${PRETRAIN:-features/demo}
    SUBSET_N=${SUBSET_N:-0}
    PT_ARGS=${PT_ARGS:---D 64 --n-layers 2 --n-heads 4 --dec-layers 1 --M 48 --epochs 1 --batch-size 8 --lr 1e-3 --limit-steps 5 --num-workers 0}
    FT_ARGS=${FT_ARGS:---features features/demo --epochs 1 --batch-size 8 --limit-steps 5 --num-workers 0}
    AN_ARGS="--tsne-n 120"
else
    RUNS=${RUNS:-runs}
    PRETRAIN=${PRETRAIN:-features/pretrain}
    SUBSET_N=${SUBSET_N:-22000}
    PT_ARGS=${PT_ARGS:-}
    FT_ARGS=${FT_ARGS:-}
    AN_ARGS=""
fi
read -ra PT <<< "$PT_ARGS"
read -ra FT <<< "$FT_ARGS"
read -ra AN <<< "$AN_ARGS"

run() {   # print a command, then run it (unless DRY_RUN=1)
    echo "+ $*"
    [[ $DRY_RUN == 1 ]] || "$@"
}

wanted() {   # is this run selected by ONLY (empty = all)?
    [[ -z $ONLY || " $ONLY " == *" $1 "* ]]
}

# ---- data -----------------------------------------------------------------------------------
if [[ $QUICK == 1 && ! -f $PRETRAIN/manifest.tsv ]]; then
    run "$PYTHON" demo.py --out "$PRETRAIN"
fi
if [[ $DRY_RUN != 1 && ! -f $PRETRAIN/manifest.tsv ]]; then
    echo "error: no feature set at $PRETRAIN (extract_features.py --source alphafold ...; see README), or QUICK=1" >&2
    exit 2
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

# ---- pretrain + finetune --------------------------------------------------------------------
ALL_TASKS=(ec go-mf go-cc go-bp)
ABL_TASKS=(ec go-mf)

experiment() {   # experiment NAME FEATURES "TASKS" [amma.py flags...]
    local name=$1 features=$2 tasks=$3
    shift 3
    wanted "$name" || return 0
    run "${LAUNCH_CMD[@]}" amma.py --pretrain --features "$features" --out "$RUNS/$name" --seed "$SEED" \
        --resume "$@" "${PT[@]}"
    for task in $tasks; do
        run "${LAUNCH_CMD[@]}" finetune.py --task "$task" --ckpt "$RUNS/$name/checkpoint.pt" --resume "${FT[@]}"
    done
}

# Table 2: the three pretraining strategies on the full set, all four tasks
experiment amma        "$PRETRAIN" "${ALL_TASKS[*]}" --variant asymmetric --alpha 1 2 2
experiment symmetric   "$PRETRAIN" "${ALL_TASKS[*]}" --variant symmetric --alpha 1 2 2
experiment contrastive "$PRETRAIN" "${ALL_TASKS[*]}" --variant contrastive
# Table 4: Dirichlet alphas (seq, str, func) on the subset, EC and GO-MF
for alpha in "1 1 1" "1 2 2" "2 1 1" "2 1 2"; do
    read -ra a <<< "$alpha"
    experiment "alpha-${a[0]}-${a[1]}-${a[2]}" "$ABLATION" "${ABL_TASKS[*]}" --variant asymmetric --alpha "${a[@]}"
done
# Table 6: without auxiliary decoder inputs, on the subset, EC and GO-MF
experiment noaux "$ABLATION" "${ABL_TASKS[*]}" --variant no-aux --alpha 1 2 2

# ---- collect and analyse --------------------------------------------------------------------
run "$PYTHON" analyze.py --collect "$RUNS"
if [[ $ANALYZE == 1 ]] && wanted amma; then
    CON=()
    if [[ -f $RUNS/contrastive/checkpoint.pt || ($DRY_RUN == 1 && -z $ONLY) ]]; then
        CON=(--contrastive-ckpt "$RUNS/contrastive/checkpoint.pt")
    fi
    run "$PYTHON" amma.py --analyze --ckpt "$RUNS/amma/checkpoint.pt" "${CON[@]}" --features "$PRETRAIN" \
        --seed "$SEED" "${AN[@]}"
fi
