#!/usr/bin/env bash
# Three synthetic datasets made by the service from Fitzpatrick17k photos, each evaluated
# against the real photos they came from (issue 23, "On real data"). Run in the checkout
# with `make run` going and SYNTHDERM_API_KEY set; the result is
# docs/results/fitzpatrick17k-evaluation.md.
set -euo pipefail
S=.venv/bin/synthderm
D=../shared/data/fitzpatrick17k_ajl21
OUT=${OUT:-docs/results/fitzpatrick17k-evaluation}
CONDITIONS="squamous-cell-carcinoma basal-cell-carcinoma folliculitis acne-vulgaris"
# 1. the real photos: 4 conditions, 60 train + 20 test photos each (320)
awk -F, 'NR == 1 || ($2 ~ /^(squamous-cell-carcinoma|basal-cell-carcinoma|folliculitis|acne-vulgaris)$/ && ++n[$2 $3] <= ($3 == "train" ? 60 : 20))' \
  $D/metadata.csv > /tmp/eval.csv
tar -cf /tmp/eval.tar -C $D $(tail -n +2 /tmp/eval.csv | cut -d, -f1)
REAL=$($S datasets upload /tmp/eval.tar --csv /tmp/eval.csv --name fitz-eval 2>/dev/null \
  | python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["dataset_id"])')
echo "real dataset $REAL"
target() { if [ -n "$1" ]; then echo "--dataset-id $1"; else echo "--dataset-name $2"; fi; }
dataset_of() { python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["dataset_id"])'; }
# 2. synthetic sets with tiny-random (the embedded default's random-weight generator): image-to-image
# children of every photo at strength 0.3 and 0.75, and text-to-image, 5 per Fitzpatrick type
SYN_A=""; SYN_B=""; SYN_C=""
for C in $CONDITIONS; do
  A=$($S jobs submit --condition $C --strategy image-to-image --source-dataset $REAL --k 1 \
      --strength 0.3 --steps 20 $(target "$SYN_A" fitz-i2i-0.3) --wait 2>/dev/null | dataset_of)
  SYN_A=$A
  B=$($S jobs submit --condition $C --strategy image-to-image --source-dataset $REAL --k 1 \
      --strength 0.75 --steps 20 $(target "$SYN_B" fitz-i2i-0.75) --wait 2>/dev/null | dataset_of)
  SYN_B=$B
  for T in 1 2 3 4 5 6; do
    X=$($S jobs submit --condition $C --count 5 --skin-tone $T --steps 20 \
        $(target "$SYN_C" fitz-t2i) --wait 2>/dev/null | dataset_of)
    SYN_C=$X
  done
done
echo "synthetic: i2i-0.3 $SYN_A, i2i-0.75 $SYN_B, t2i $SYN_C"
# 3. one evaluation each, and its report
for pair in "i2i-strength-0.3:$SYN_A" "i2i-strength-0.75:$SYN_B" "t2i-by-skin-type:$SYN_C"; do
  NAME=${pair%%:*}; SYN=${pair#*:}
  EV=$($S evaluations submit --synthetic-dataset $SYN --real-dataset $REAL --seed 1 --wait 2>/dev/null \
       | python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["id"])')
  $S evaluations report $EV --out $OUT/$NAME
  # the contact sheet and the closest pairs show the patients' photos (research use only):
  # never commit them (docs/results/fitzpatrick17k-evaluation.md)
  rm -f $OUT/$NAME/contact-sheet*.* $OUT/$NAME/closest-pairs.*
  sed -i '/^!\[contact-sheet\|^!\[closest-pairs\]/d' $OUT/$NAME/report.md
done
