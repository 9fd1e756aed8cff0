#!/usr/bin/env bash
# Reproduce every table and figure of the GRPO-RM paper, or a CPU-scale miniature of them.
#
#   bash run_all.sh TARGET        TARGET: table2 table3 table4 table5 table6 fig2 fig3 mini all
#
# Environment (defaults in brackets):
#   NPROC      processes (GPUs) per run [4; mini: 1]
#   DATA_ROOT  folder holding the datasets [data; mini: ../shared/data] with the layouts of README.md:
#              cifar10/ cifar100/ stl10/ (torchvision), tiny-imagenet-200/, imagenet/{train,val}/,
#              voc/VOCdevkit/VOC2012/, ade20k/ADEChallengeData2016/, cocostuff/{images,stuffthingmaps}/
#   OUT        where runs write OUT/NAME/result.json [runs; mini: runs-mini]
#   SEEDS      seeds of every configuration ["0 1 2 3 4"; mini: "0 1 2"]
#   HUB_REPO   torch.hub repository [facebookresearch/dinov2; mini: ../shared/hub]
#   MODEL      hub entry point [dinov2_vits14; mini: dinov2_vitt8_tin]
#   WEIGHTS    optional local weights file for the backbone (offline use)
#   PYTHON     [python3]
# A run whose OUT/NAME/result.json exists is skipped, and an interrupted run continues from its
# checkpoint (--resume), so an interrupted reproduction picks up where it stopped. Every target ends
# by aggregating OUT into markdown tables, CSV and PNG curves (python grpo_rm.py --report OUT).
set -euo pipefail
cd "$(dirname "$0")"

TARGET=${1:-}
PYTHON=${PYTHON:-python3}
MINI=0
if [[ $TARGET == mini ]]; then MINI=1; fi
if (( MINI )); then
  NPROC=${NPROC:-1}; DATA_ROOT=${DATA_ROOT:-../shared/data}; OUT=${OUT:-runs-mini}; SEEDS=${SEEDS:-"0 1 2"}
  HUB_REPO=${HUB_REPO:-../shared/hub}; MODEL=${MODEL:-dinov2_vitt8_tin}
else
  NPROC=${NPROC:-4}; DATA_ROOT=${DATA_ROOT:-data}; OUT=${OUT:-runs}; SEEDS=${SEEDS:-"0 1 2 3 4"}
  HUB_REPO=${HUB_REPO:-facebookresearch/dinov2}; MODEL=${MODEL:-dinov2_vits14}
fi
WEIGHTS=${WEIGHTS:-}
backbone=(--hub-repo "$HUB_REPO" --model "$MODEL")
if [[ -n $WEIGHTS ]]; then backbone+=(--weights "$WEIGHTS"); fi

# run NAME FLAG...: one experiment, unless OUT/NAME/result.json says it finished already.
run() {
  local name=$1; shift
  if [[ -f "$OUT/$name/result.json" ]]; then
    echo "== $name: done, skipped"
    return
  fi
  echo "== $name"
  if (( NPROC > 1 )); then
    torchrun --standalone --nproc_per_node="$NPROC" grpo_rm.py --name "$name" --out "$OUT" --resume "${backbone[@]}" "$@"
  else
    "$PYTHON" grpo_rm.py --name "$name" --out "$OUT" --resume "${backbone[@]}" "$@"
  fi
}

report() { "$PYTHON" grpo_rm.py --report "$OUT"; }

# Classification (Table 3, Table 6, Figure 3): DATASET DIR METHOD SEED [FLAG...]
cls() {
  local ds=$1 dir=$2 method=$3 seed=$4; shift 4
  local name="cls-$ds-$method-s$seed"
  if [[ $method == grpo* ]]; then name="cls-$ds-grpo-${method#grpo-}-s$seed"; method=grpo; fi
  run "$name" --dataset "$ds" --data-dir "$DATA_ROOT/$dir" --method "$method" --seed "$seed" "$@"
}
CLS_SETS=("cifar10 cifar10" "cifar100 cifar100" "stl10 stl10" "tinyimagenet tiny-imagenet-200" "imagenet imagenet")

table3() {
  for seed in $SEEDS; do for set in "${CLS_SETS[@]}"; do for method in frozen ce grpo-eq4; do
    # shellcheck disable=SC2086  # $set is "NAME DIR"
    cls $set "$method" "$seed" --uniformity eq4
  done; done; done
}

fig3() {  # training-loss curves: the Table 3 runs of ImageNet and Tiny-ImageNet
  for seed in $SEEDS; do for method in ce grpo-eq4; do
    cls tinyimagenet tiny-imagenet-200 "$method" "$seed"
    cls imagenet imagenet "$method" "$seed"
  done; done
}

table6() {  # uniformity ablation: "set to 0", Eq. (5), Eq. (4)
  for seed in $SEEDS; do for u in none eq5 eq4; do
    cls stl10 stl10 "grpo-$u" "$seed" --uniformity "$u"
    cls tinyimagenet tiny-imagenet-200 "grpo-$u" "$seed" --uniformity "$u"
    cls imagenet imagenet "grpo-$u" "$seed" --uniformity "$u"
    seg voc voc "grpo-$u" "$seed" linear 1 --uniformity "$u"
  done; done
}

# Segmentation (Tables 2 and 4, Figure 2): DATASET DIR METHOD SEED FEATURE SUBSET [FLAG...]
seg() {
  local ds=$1 dir=$2 method=$3 seed=$4 feature=$5 subset=$6; shift 6
  local name="seg-$ds-$method-$feature-sub$subset-s$seed"
  if [[ $method == grpo* ]]; then method=grpo; fi
  run "$name" --task seg --dataset "$ds" --data-dir "$DATA_ROOT/$dir" --method "$method" --seed "$seed" \
    --feature-type "$feature" --subset "$subset" --save-vis 8 "$@"
}

seg_table() {  # DATASET DIR
  for seed in $SEEDS; do for feature in linear ms; do
    seg "$1" "$2" frozen "$seed" "$feature" 1
    for method in ce grpo-eq4; do for subset in 0.1 1; do
      seg "$1" "$2" "$method" "$seed" "$feature" "$subset"
    done; done
  done; done
}
table2() { seg_table voc voc; seg_table ade20k ade20k; }
table4() { seg_table cocostuff cocostuff; }

fig2() {  # segmentation visualisations: image | truth | prediction, frozen vs ce vs grpo (first seed)
  local seed=${SEEDS%% *}
  for method in frozen ce grpo-eq4; do seg voc voc "$method" "$seed" linear 1; done
}

table5() {  # cost of ce vs grpo at the paper's batch sizes (synthetic data of the same shape, one GPU)
  local args
  for args in "tinyimagenet tiny-imagenet-200 cls 1024" "imagenet imagenet cls 1024" \
              "voc voc seg 256" "cocostuff cocostuff seg 256"; do
    read -r ds dir task batch <<< "$args"
    "$PYTHON" grpo_rm.py --bench --task "$task" --dataset "$ds" --data-dir "$DATA_ROOT/$dir" \
      --batch-size "$batch" --out "$OUT" "${backbone[@]}"
  done
}

mini() {  # CPU-scale miniature on the small real datasets; about 40 minutes on 2 cores
  local seed method
  for seed in $SEEDS; do for method in frozen ce grpo-eq4; do
    cls imagefolder cifar10_jpg_mini "$method" "$seed" --img-size 32 --batch-size 256 --epochs 6 \
      --eval-epochs 20 --preload --workers 2
    cls tinyimagenet tiny-imagenet-200-mini "$method" "$seed" --img-size 64 --batch-size 256 --epochs 4 \
      --eval-epochs 20 --workers 2
    seg vocfolder camvid_voc "$method" "$seed" linear 1 --num-classes 11 --img-size 64 --seg-size 32 \
      --batch-size 32 --epochs 6 --lr 1e-3 --eval-epochs 10 --eval-lr 1e-2 --workers 2
  done; done
}

case $TARGET in
  table2|table3|table4|table5|table6|fig2|fig3|mini) "$TARGET"; report ;;
  all) table3; table2; table4; table5; table6; fig2; fig3; report ;;
  *) echo "usage: bash run_all.sh {table2|table3|table4|table5|table6|fig2|fig3|mini|all}" >&2; exit 2 ;;
esac
