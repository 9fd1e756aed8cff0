#!/usr/bin/env bash
# Reproduce the tables and figures of the GRPO-RM paper, or a paper-length miniature of them.
#
#   bash run_all.sh TARGET      (bash run_all.sh --help prints this header)
#
# Targets, and how long they take:
#   table2 table3 table4 table6 fig2 fig3   the paper's runs at full scale on NPROC GPUs. Not timed
#            whole. An estimate from results/bench-gpu (one H100, the code before its rewrite):
#            GRPO-RM trains ViT-S/14 at ~2,900 img/s a GPU, so an ImageNet epoch takes ~2 min on
#            4 GPUs and its 100 epochs ~3.5 h a run, evaluation apart.
#   table5   the benchmark (synthetic batches): minutes
#   all      table3 table2 table4 table5 table6 fig2: every paper target, the sum of their times:
#            days on 4 GPUs (not mini, stable, backbone, which are separate)
#   mini     the paper-length miniature on 2 CPU cores: ~2.5 h for SEEDS="0 1 2" (JOBS=2
#            OMP_NUM_THREADS=1), ~4 h for five seeds; SCALE=gpu: ~16 min on one H100 (CIFAR-10)
#   stable   the stabilisers (VARIANTS) on 2 CPU cores, one thread a run: 20 to 80 min a CIFAR-10
#            run (2,000 images), ~25 min a Tiny-ImageNet run, ~10 min a CamVid run
#   backbone the miniature's backbone, pretrained into OUT/hub-tin: ~8 min an epoch on 2 CPU
#            cores, 13 epochs
#   assets   the miniature's data and backbone from public sources: tools/prepare_data.py mini
#            into DATA_ROOT (the downloads, then ~30 s of cutting and checking on 2 CPU cores),
#            then the backbone target (OUT/hub-tin): ~2 h on 2 CPU cores
#
# Environment (defaults in brackets):
#   NPROC      processes (GPUs) per run [4; mini and stable: 1]
#   DATA_ROOT  the datasets, in the layouts of README.md [data; also for mini and stable, whose
#              cifar10_jpg_mini/ tiny-imagenet-200-mini/ camvid_voc/ the assets target makes]:
#              cifar10/ cifar100/ stl10/ (torchvision), tinyimagenet/, imagenet/{train,val}/,
#              voc/VOCdevkit/VOC2012/, ade20k/, cocostuff/ (tinyimagenet, ade20k and cocostuff as
#              tools/prepare_data.py leaves them; the targets that need them run it first)
#   OUT        runs go to OUT/NAME/result.json [runs; mini and stable: runs-mini]
#   SEEDS      seeds of the configurations the paper ran 5 times ["0 1 2 3 4"]; the rows it ran
#              once (frozen DINOv2, Table 4, Table 6) take the first seed only
#   HUB_REPO   torch.hub repository [grpo_rm.py's pinned DINOv2 commit; mini and stable:
#              runs/hub-tin, the miniature's backbone as the assets target pretrains it]
#   MODEL      hub entry point [dinov2_vits14; mini and stable: dinov2_vitt8_tin]
#   WEIGHTS    a local weights file for the backbone (offline use)
#   SCALE      mini only: cpu (subsets; with JOBS=2 OMP_NUM_THREADS=1 on 2 cores about 2.5 hours
#              for SEEDS="0 1 2", 4 for five seeds) or gpu (whole sets, 50 steps an epoch; CIFAR-10
#              with five seeds and the lr sweep: about 16 minutes on one H100 with JOBS=6)
#   SETS       mini and stable: which of their datasets to run ["cifar10 tinyimagenet camvid";
#              stable: "cifar10"]
#   JOBS       runs at once [1]; small runs share the cores or the GPU better than one run alone
#   PYTHON     [python3]
# A run whose OUT/NAME/result.json exists is skipped and an interrupted run resumes from its
# checkpoint (--resume), so an interrupted reproduction picks up where it stopped. Every target
# ends with the report: python3 tools/report.py OUT (tables, figures).
set -euo pipefail
cd "$(dirname "$0")"

TARGET=${1:-}
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-1}
SEEDS=${SEEDS:-"0 1 2 3 4"}
if [[ $TARGET == mini || $TARGET == stable ]]; then
  NPROC=${NPROC:-1}; DATA_ROOT=${DATA_ROOT:-data}; OUT=${OUT:-runs-mini}
  HUB_REPO=${HUB_REPO:-runs/hub-tin}; MODEL=${MODEL:-dinov2_vitt8_tin}; SCALE=${SCALE:-cpu}
else
  NPROC=${NPROC:-4}; DATA_ROOT=${DATA_ROOT:-data}; OUT=${OUT:-runs}
  HUB_REPO=${HUB_REPO:-}; MODEL=${MODEL:-dinov2_vits14}
fi
FIRST=${SEEDS%% *}
backbone=(--model "$MODEL")
if [[ -n $HUB_REPO ]]; then backbone+=(--hub-repo "$HUB_REPO"); fi
if [[ -n ${WEIGHTS:-} ]]; then backbone+=(--weights "$WEIGHTS"); fi

# run NAME FLAG...: one experiment, unless OUT/NAME/result.json says it finished; with JOBS > 1
# it runs in the background once fewer than JOBS runs are under way.
run() {
  local name=$1; shift
  if [[ -f "$OUT/$name/result.json" ]]; then echo "== $name: done, skipped"; return; fi
  local cmd=("$PYTHON" grpo_rm.py)
  if (( NPROC > 1 )); then cmd=(torchrun --standalone --nproc_per_node="$NPROC" grpo_rm.py); fi
  cmd+=(--name "$name" --out "$OUT" --resume "${backbone[@]}" "$@")
  if (( JOBS == 1 )); then echo "== $name"; "${cmd[@]}"; return; fi
  while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
  mkdir -p "$OUT/logs"
  echo "== $name (background, log $OUT/logs/$name.log)"
  "${cmd[@]}" > "$OUT/logs/$name.log" 2>&1 &
}

report() { wait; "$PYTHON" tools/report.py "$OUT"; }

# path DIR: DIR under DATA_ROOT, or DIR itself if it is absolute
path() { if [[ $1 == /* ]]; then echo "$1"; else echo "$DATA_ROOT/$1"; fi; }
# prepare NAME DIR [SRC]: tools/prepare_data.py puts NAME into DIR's layout (from SRC, an official
# copy extracted already, or downloaded); what is there already is kept
prepare() {
  local src=(); if [[ -n ${3:-} ]]; then src=(--src "$3"); fi
  "$PYTHON" tools/prepare_data.py "$1" --data-dir "$(path "$2")" "${src[@]}"
}

# METHOD: frozen, ce or grpo-UNIFORMITY -> the flags in the array m
method_flags() {
  m=(--method "${1%%-*}")
  if [[ $1 == grpo-* ]]; then m+=(--uniformity "${1#grpo-}"); fi
}
# cls DATASET DIR METHOD SEED [FLAG...]; TAG=x cls ... names the run cls-DATASET-METHOD-x-sSEED
cls() {
  local ds=$1 dir=$2 method=$3 seed=$4 m; shift 4
  method_flags "$method"
  run "cls-$ds-$method${TAG:+-$TAG}-s$seed" --dataset "$ds" --data-dir "$(path "$dir")" \
    "${m[@]}" --seed "$seed" "$@"
}
# seg DATASET DIR METHOD SEED SUBSET [FLAG...] (TAG as cls's): one post-training, evaluated with the linear and
# the multi-scale features (the paper's two "feature types" are two evaluations of one backbone)
seg() {
  local ds=$1 dir=$2 method=$3 seed=$4 subset=$5 m; shift 5
  method_flags "$method"
  run "seg-$ds-$method${TAG:+-$TAG}-sub$subset-s$seed" --dataset "$ds" --data-dir "$(path "$dir")" "${m[@]}" \
    --seed "$seed" --subset "$subset" --feature-type linear ms --save-vis 8 "$@"
}
CLS_SETS=("cifar10 cifar10" "cifar100 cifar100" "stl10 stl10" "tinyimagenet tinyimagenet" \
          "imagenet imagenet")

table3() {  # also Figure 3's runs (Tiny-ImageNet, ImageNet: ce and grpo)
  local set seed method
  prepare tinyimagenet tinyimagenet
  for set in "${CLS_SETS[@]}"; do
    # shellcheck disable=SC2086  # $set is "NAME DIR"
    cls $set frozen "$FIRST"
    for seed in $SEEDS; do for method in ce grpo-eq4; do
      # shellcheck disable=SC2086
      cls $set "$method" "$seed"
    done; done
  done
}
fig3() { table3; }

seg_table() {  # DATASET DIR SEEDS: frozen once; ce and grpo on 10% and on all of the training set
  local ds=$1 dir=$2 seeds=$3 seed method subset
  seg "$ds" "$dir" frozen "$FIRST" 1
  for seed in $seeds; do for method in ce grpo-eq4; do for subset in 0.1 1; do
    seg "$ds" "$dir" "$method" "$seed" "$subset"
  done; done; done
}
table2() { seg_table voc voc "$SEEDS"; prepare ade20k ade20k; seg_table ade20k ade20k "$SEEDS"; }
table4() { prepare cocostuff cocostuff; seg_table cocostuff cocostuff "$FIRST"; }  # single runs
fig2() { seg voc voc frozen "$FIRST" 1; seg voc voc ce "$FIRST" 1; seg voc voc grpo-eq4 "$FIRST" 1; }

table6() {  # uniformity ablation, single runs in the paper; the eq4 runs are Table 3's / 2's
  local u
  prepare tinyimagenet tinyimagenet
  for u in none eq5 eq4; do
    cls stl10 stl10 "grpo-$u" "$FIRST"
    cls tinyimagenet tinyimagenet "grpo-$u" "$FIRST"
    cls imagenet imagenet "grpo-$u" "$FIRST"
    seg voc voc "grpo-$u" "$FIRST" 1
  done
}

table5() {  # the paper's batch over NPROC processes, synthetic batches of each dataset's shape
  local args ds task batch
  for args in "tinyimagenet cls 1024" "imagenet cls 1024" "voc seg 256" "cocostuff seg 256"; do
    read -r ds task batch <<< "$args"
    local cmd=("$PYTHON" tools/bench.py)
    if (( NPROC > 1 )); then cmd=(torchrun --standalone --nproc_per_node="$NPROC" tools/bench.py); fi
    "${cmd[@]}" --task "$task" --dataset "$ds" --batch-size "$batch" --out "$OUT" \
      "${backbone[@]}"
  done
}

# The paper-length miniature: the paper's 100 epochs, on small real datasets, with the small
# pretrained backbone (both: the assets target). SCALE=gpu post-trains on whole sets with 50 steps an epoch (the
# paper's CIFAR-10 run has 50,000 / 1,024 = 49). SCALE=cpu post-trains on subsets with 16 steps an
# epoch: 320 CIFAR-10 and 320 Tiny-ImageNet images (batch 20), 128 CamVid images (batch 8). The
# evaluation heads always train on the whole training split.
want() { [[ " ${SETS:-cifar10 tinyimagenet camvid} " == *" $1 "* ]]; }  # mini: SETS names $1
# The miniature's Tiny-ImageNet (official layout) in the layout grpo_rm.py reads, under OUT
tin_mini() {
  TIN_MINI=$(realpath -m "$OUT/data/tinyimagenet-mini")
  prepare tinyimagenet "$TIN_MINI" "$DATA_ROOT/tiny-imagenet-200-mini" > /dev/null
}

mini() {
  local c10 tin cam cam_sub
  if [[ $SCALE == gpu ]]; then
    c10=(--subset 1 --batch-size 200); tin=(--subset 1 --batch-size 100)
    cam=(--batch-size 32); cam_sub=1
  else
    c10=(--subset 0.032 --batch-size 20); tin=(--subset 0.064 --batch-size 20)
    cam=(--batch-size 8); cam_sub=0.35
  fi
  local seed method lr
  local c10_flags=(--img-size 32 "${c10[@]}" --epochs 100 --eval-lr 1e-3 --workers 2)
  if want tinyimagenet; then tin_mini; fi
  for seed in $SEEDS; do for method in frozen ce grpo-eq4; do
    if want cifar10; then
      cls imagefolder cifar10_jpg_mini "$method" "$seed" "${c10_flags[@]}"
    fi
    if want tinyimagenet; then
      cls tinyimagenet "$TIN_MINI" "$method" "$seed" "${tin[@]}" --epochs 100 --workers 2
    fi
    if want camvid; then
      seg vocfolder camvid_voc "$method" "$seed" "$cam_sub" --num-classes 11 --img-size 64 \
        --seg-size 32 "${cam[@]}" --epochs 100 --lr 1e-3 --eval-lr 1e-2 --workers 2
    fi
  done; done
  if want camvid; then
    for seed in $SEEDS; do  # the paper's evaluation lr for segmentation, on the frozen backbone
      run "seg-vocfolder-frozen-evallr1e-5-s$seed" --dataset vocfolder --num-classes 11 \
        --data-dir "$DATA_ROOT/camvid_voc" --method frozen --seed "$seed" --img-size 64 \
        --seg-size 32 "${cam[@]}" --eval-lr 1e-5 --feature-type linear ms --workers 2
    done
  fi
  if want cifar10; then
    for seed in 0 1 2; do for lr in 1e-4 1e-5; do for method in ce grpo-eq4; do  # lr sweep
      TAG=lr$lr cls imagefolder cifar10_jpg_mini "$method" "$seed" "${c10_flags[@]}" --lr "$lr"
    done; done; done
  fi
}

# Beyond the paper (README): GRPO-RM at the paper's lr on 2,000 CIFAR-10 images of the miniature's
# folder (32 px, batch 64, 100 epochs, fp32, evaluated on all 10,000 + 2,000), where the paper's
# form collapses, beside fine-tuning and the stabilisers: --dual-clip 3, --old-every 1 and 8, and
# --dual-clip 3 with --kl-coef 1; frozen: the same evaluation of the untouched backbone. VARIANTS
# picks some of them ["frozen ce paper dc3 old1 old8 dc3kl1"]. SETS names the datasets ["cifar10"]:
# "tinyimagenet" and "camvid" run them on the miniature's Tiny-ImageNet and CamVid at mini's CPU
# scale (CamVid: the linear and the multi-scale evaluation).
stable() {
  local f=(--img-size 32 --subset 0.2 --batch-size 64 --epochs 100 --eval-lr 1e-3 --dtype fp32)
  local tin=(--subset 0.064 --batch-size 20 --epochs 100)
  local cam=(--num-classes 11 --img-size 64 --seg-size 32 --batch-size 8 --epochs 100 --lr 1e-3
             --eval-lr 1e-2 --workers 1)
  local -A flags=([paper]="" [dc3]="--dual-clip 3" [old1]="--old-every 1" [old8]="--old-every 8"
                  [dc3kl1]="--dual-clip 3 --kl-coef 1")
  local seed v
  if [[ " ${SETS:-cifar10} " == *" tinyimagenet "* ]]; then tin_mini; fi
  for seed in $SEEDS; do for v in ${VARIANTS:-frozen ce paper dc3 old1 old8 dc3kl1}; do
    if [[ " ${SETS:-cifar10} " == *" cifar10 "* ]]; then
      if [[ $v == ce || $v == frozen ]]; then
        TAG=stable cls imagefolder cifar10_jpg_mini "$v" "$seed" "${f[@]}" --workers 1
      else
        # shellcheck disable=SC2086  # the variant's flags, split on spaces
        TAG=$v cls imagefolder cifar10_jpg_mini grpo-eq4 "$seed" "${f[@]}" --workers 1 ${flags[$v]}
      fi
    fi
    if [[ " ${SETS:-cifar10} " == *" tinyimagenet "* ]]; then
      if [[ $v == ce || $v == frozen ]]; then
        TAG= cls tinyimagenet "$TIN_MINI" "$v" "$seed" "${tin[@]}" --workers 1
      else
        # shellcheck disable=SC2086
        TAG=$v cls tinyimagenet "$TIN_MINI" grpo-eq4 "$seed" "${tin[@]}" --workers 1 \
          ${flags[$v]}
      fi
    fi
    if [[ " ${SETS:-cifar10} " == *" camvid "* ]]; then
      if [[ $v == ce || $v == frozen ]]; then
        seg vocfolder camvid_voc "$v" "$seed" 0.35 "${cam[@]}"
      else
        # shellcheck disable=SC2086
        TAG=$v seg vocfolder camvid_voc grpo-eq4 "$seed" 0.35 "${cam[@]}" ${flags[$v]}
      fi
    fi
  done; done
}

# The miniature's backbone, dinov2_vitt8_tin, pretrained by its recipe on Tiny-ImageNet-200 into the
# torch.hub folder OUT/hub-tin (HUB_REPO for mini and stable); it resumes where it stopped
backbone() {
  prepare tinyimagenet tinyimagenet
  "$PYTHON" tools/pretrain_backbone.py --data-dir "$(path tinyimagenet)" --out "$OUT/hub-tin" --resume
}

# The miniature's folders, rebuilt from their public sources into DATA_ROOT and checked against
# tools/mini_assets.json (a checked folder is kept), then its backbone pretrained into OUT/hub-tin;
# Tiny-ImageNet's zip is downloaded once for both
assets() {
  "$PYTHON" tools/prepare_data.py mini --data-dir "$DATA_ROOT"
  backbone
}

case $TARGET in
  -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  backbone) backbone ;;
  assets) assets ;;
  table2|table3|table4|table5|table6|fig2|fig3|mini|stable) "$TARGET"; report ;;
  all) table3; table2; table4; table5; table6; fig2; report ;;
  *) echo "usage: bash run_all.sh {table2|table3|table4|table5|table6|fig2|fig3|mini|stable|all|backbone|assets}" >&2
     echo "       bash run_all.sh --help: what each does, how long it takes, its settings" >&2
     exit 2 ;;
esac
