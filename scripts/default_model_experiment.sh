#!/usr/bin/env bash
# Issue 24's question, on the embedded default with the project's own generator: does adding
# synthderm-fitz64's synthetic children to n_real real photos per class help an EfficientNet-
# Lite0 classifier on the Fitzpatrick17k test split, and for which skin types?
# Real-only against real + k children (k 1, 5, 10; text-to-image and inpaint) at n_real 8, 16,
# 32, three seeds, the 9 commonest conditions. Run in the checkout with `make run` going and
# SYNTHDERM_API_KEY set; the service's report goes to $OUT (docs/results/...).
# On the 2-core CPU: 49-95 minutes for the 10,080 children, by the VM (start the service with
# SYNTHDERM_GENERATION_BATCH_SIZE=32; a second `-Q gpu` worker helps, since every job is
# submitted before the first is waited for), then 3-7 minutes for the 63 runs (2026-12-07).
#
# The training pool is cut to PER_CLASS train photos per class with a known skin type (the
# first in path order), so that children are made only for photos a run can draw: VALID of
# them validate, n_real <= 32 train. The test split is the whole of it for the 9 classes.
# Each child is made from a parent of one Fitzpatrick type with that type in its prompt.
set -euo pipefail
S=${S:-.venv/bin/synthderm}
D=../shared/data/fitzpatrick17k_ajl21
OUT=${OUT:-docs/results/synthderm-fitz64-experiment}
PER_CLASS=${PER_CLASS:-56}
VALID=${VALID:-16}
STEPS=${STEPS:-25}
GUIDANCE=${GUIDANCE:-}  # empty: each model's own default (12 for synthderm-fitz64)
K=${K:-10}
SEEDS=${SEEDS:-1,2,3}
TOP9=${TOP9:-acne,acne-vulgaris,actinic-keratosis,basal-cell-carcinoma,eczema,folliculitis,melanoma,mycosis-fungoides,squamous-cell-carcinoma}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. the CSVs: the experiment's photos (train subset + test) and the parents (train subset),
# and the (condition, type) pairs the parents have
python3 - "$D/metadata.csv" "$WORK" "$PER_CLASS" "$TOP9" <<'EOF'
import csv, sys
from collections import Counter
src, work, per_class, top = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
rows = sorted(csv.DictReader(open(src, newline="")), key=lambda r: r["path"])
taken = Counter()
parents, everything, pairs = [], [], set()
for row in rows:
    if row["label"] not in top:
        continue
    if row["split"] == "test":
        everything.append(row)
    elif row["split"] == "train" and row["fitzpatrick_scale"] in {"1", "2", "3", "4", "5", "6"} and taken[row["label"]] < per_class:
        taken[row["label"]] += 1
        parents.append(row)
        everything.append(row)
        pairs.add((row["label"], row["fitzpatrick_scale"]))
for name, chosen in (("all", everything), ("parents", parents)):
    with open(f"{work}/{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
with open(f"{work}/pairs.txt", "w") as handle:
    handle.writelines(f"{label} {tone}\n" for label, tone in sorted(pairs))
print(f"{len(everything)} photos ({len(parents)} train parents), {len(pairs)} condition x type pairs")
EOF
dataset_of() { python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["dataset_id"])'; }
upload() {  # CSV NAME -> dataset id
  tar -cf "$WORK/$2.tar" -C $D $(tail -n +2 "$1" | cut -d, -f1)
  $S datasets upload "$WORK/$2.tar" --csv "$1" --name "$2" --on-error skip 2>/dev/null | dataset_of
}
REAL=$(upload "$WORK/all.csv" fitz-top9-experiment)
PARENTS=$(upload "$WORK/parents.csv" fitz-top9-parents)
echo "real dataset $REAL, parents $PARENTS"

# 2. the children: k per parent, for each strategy, in one synthetic dataset. Every job is
# submitted first and then waited for, so that a second `-Q gpu` worker helps all the way.
SYN=""
target() { if [ -n "$SYN" ]; then echo "--dataset-id $SYN"; else echo "--dataset-name synthderm-fitz64-children"; fi; }
job_of() { python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):]); print(j["id"], j["dataset_id"])'; }
: > "$WORK/jobs.txt"
while read -r C T; do
  for pair in "inpaint:synthderm-fitz64-inpaint" "text-to-image:synthderm-fitz64"; do
    STRATEGY=${pair%%:*}; MODEL=${pair#*:}
    read -r JOB SYN < <($S jobs submit --condition "$C" --skin-tone "$T" --strategy "$STRATEGY" \
          --model "$MODEL" --source-dataset "$PARENTS" --k "$K" --steps "$STEPS" \
          ${GUIDANCE:+--guidance "$GUIDANCE"} $(target) 2>/dev/null | job_of)
    [ -n "$JOB" ] || { echo "submitting $C type $T $STRATEGY failed"; exit 1; }
    echo "$JOB $C $T $STRATEGY" >> "$WORK/jobs.txt"
  done
done < "$WORK/pairs.txt"
echo "$(wc -l < "$WORK/jobs.txt") jobs submitted into synthetic dataset $SYN"
while read -r JOB C T STRATEGY; do
  $S jobs wait "$JOB" > "$WORK/job.json" 2>/dev/null || { echo "job $JOB ($C type $T, $STRATEGY) failed:"; cat "$WORK/job.json"; exit 1; }
  echo "$C type $T $STRATEGY: done"
done < "$WORK/jobs.txt"

# 3. the experiment and its report
EXP=$($S experiments submit --dataset "$REAL" --test-split test --conditions "$TOP9" \
      --n-real "${N_REAL:-8,16,32}" --k "${KS:-0,1,5,10}" --synthetic "$SYN" --strategies text-to-image,inpaint \
      --augmentation off --seeds "$SEEDS" --validation-per-class "$VALID" \
      --name "synthderm-fitz64 children vs real only" --wait 2>/dev/null \
      | python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["id"])')
$S experiments report "$EXP" --out "$OUT"
echo "experiment $EXP: $OUT/report.md"
