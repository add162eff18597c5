#!/bin/bash
# Does the classification head learn? A CPU run on a synthetic multi-task dataset whose class is the size of
# structure_1 (docs/benchmarks.md, "Multi-task learning run"). From the repository root:
#   OMP_NUM_THREADS=1 PYTHONPATH=$PWD benchmarks/multitask_learning.sh OUT_DIR [roi|simple|attention]
# 30 training cases (fold 0: 24 train, 6 validation), 20 test cases with known classes (imagesTs_classes.json);
# 3d_fullres, 40 epochs x 20 iterations. Prints the test cases' macro-F1/accuracy (scikit-learn) and the fold's
# validation Dice and classification (summary.json).
set -e
OUT=${1:?usage: multitask_learning.sh OUT_DIR [HEAD]}
HEAD=${2:-roi}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
python -m autoplan synthetic "$OUT/raw/Dataset971_Learn" --cases 30 --test_cases 20 --shape 32,32,16 \
    --spacing 1,1,2 --labels 2 --classes 2 --seed 7
python -m autoplan run "$OUT/raw/Dataset971_Learn" --out "$OUT/work" --processes 1 --configurations 3d_fullres \
    --folds 0 --classification_head "$HEAD"
BUNDLE="$OUT/work/bundles/Dataset971_Learn_3d_fullres_fold0"
(cd "$BUNDLE" && python -m monai.bundle run training --config_file configs/train.json --epochs 40 \
    --iterations_per_epoch 20 --val_iterations 5 --num_workers 0 --device cpu > "$OUT/train.log" 2>&1)
(cd "$BUNDLE" && python -m monai.bundle run --config_file configs/inference.json \
    --dataset_dir "$OUT/raw/Dataset971_Learn/imagesTs" --output_dir "$OUT/pred" --device cpu > "$OUT/infer.log" 2>&1)
python - "$OUT" "$BUNDLE" <<'PY'
import json, sys
from sklearn.metrics import accuracy_score, f1_score
from bundles.scripts.classification import read_classification_csv
out, bundle = sys.argv[1:]
reference = json.load(open(f"{out}/raw/Dataset971_Learn/imagesTs_classes.json"))
predicted = read_classification_csv(f"{out}/pred/classification.csv")
cases = sorted(reference)
y, p = [reference[c] for c in cases], [predicted[c][0] for c in cases]
print(f"test: {len(cases)} cases, macro-F1 {f1_score(y, p, average='macro', labels=[0, 1], zero_division=0):.4f}, "
      f"accuracy {accuracy_score(y, p):.4f}")
s = json.load(open(f"{bundle}/eval/validation/summary.json"))
c = s["classification"]
print(f"validation: foreground mean Dice {s['foreground_mean']['Dice']:.4f} "
      f"({', '.join(f'{k}: {v['Dice']:.4f}' for k, v in s['mean'].items())}), classification macro-F1 "
      f"{c['macro_f1']:.4f}, accuracy {c['accuracy']:.4f} ({c['num_cases']} cases)")
PY
