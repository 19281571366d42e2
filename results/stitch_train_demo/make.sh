#!/usr/bin/env bash
# The committed stitch-train sweep report (results/stitch_train_demo/): two small ViT anchors trained on the digits
# data (widths 16 and 32, 30 epochs, the digits demo's recipe), a sweep of linear and rank-4 stitching layers at 3 cuts x
# 2 gaps between them, the report and its screenshot. About 5 minutes on 2 CPU cores. Run from the repository root:
#     bash results/stitch_train_demo/make.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
WORK=output/stitch_train_demo
mkdir -p "$WORK"
$PY -c "from pathlib import Path; from snnet.demo import write_digits; write_digits(Path('$WORK'))"
COMMON="--img-size 16 -b 32 --opt adamw --weight-decay 0.05 --scale 0.7 1 --hflip 0 --smoothing 0.1 -j 0 --seed 0
        --log-interval 1000"
for w in 16 32; do
  [ -f "$WORK/anchor_w$w/last.pth.tar" ] || $PY train.py "$WORK/digits" --model deit_tiny_patch16_224 \
    --model-kwargs patch_size=4 depth=4 embed_dim=$w num_heads=2 --epochs 30 --lr 2e-3 --warmup-epochs 2 \
    --output "$WORK" --experiment anchor_w$w $COMMON > "$WORK/anchor_w$w.log" 2>&1
done
$PY -m snnet.cli stitch-train --sweep results/stitch_train_demo/sweep.yaml
cp "$WORK/sweep/stitches_res.txt" "$WORK/sweep/sweep.png" "$WORK/sweep/curves.png" results/stitch_train_demo/
$PY -m snnet.cli report results/stitch_train_demo/stitches_res.txt --out results/stitch_train_demo/report.html \
    --title "stitch-train on digits: w16 -> w32, 2 layer types x 3 cuts x 2 gaps"
$PY tests/test_report.py --screenshot results/stitch_train_demo/report.png --page results/stitch_train_demo/report.html
