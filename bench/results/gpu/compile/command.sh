# The compile experiment of bench/distill.py on one GPU (run from the repository root; results in $OUT).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/log.txt
for c in "F --gradient-checkpointing --compile" \
         "G --no-gradient-checkpointing --compile --activation-memory-budget 0.5" \
         "H --no-gradient-checkpointing --compile --activation-memory-budget 0.3" \
         "I --no-gradient-checkpointing --compile"; do
  set -- $c; n=$1; shift
  if [ $SECONDS -gt 330 ]; then echo "skip $n (time)" | tee -a $OUT/log.txt; continue; fi
  echo "== $n: $* (t=$SECONDS s)" | tee -a $OUT/log.txt
  timeout 150 python3 bench/distill.py --preset llama31-8b-4b-width --methods naive,chunked "$@" --out $OUT/$n.json 2>&1 \
    | grep -v "could not be imported" | tail -14 | tee -a $OUT/log.txt
  echo "rc ${PIPESTATUS[0]}" | tee -a $OUT/log.txt
done
echo "total $SECONDS s" | tee -a $OUT/log.txt
