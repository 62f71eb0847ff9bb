# Second compile experiment: the compiled KD chunk (secateurs/losses.py) under three model settings.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/log.txt
SECATEURS_TEST_DEVICE=cuda timeout 120 python3 -m pytest tests/test_losses.py -q -p no:cacheprovider --noconftest -rs 2>&1 | tail -5 | tee -a $OUT/log.txt
for c in "J" "K --compile" "L --no-gradient-checkpointing --compile --activation-memory-budget 0.5" \
         "M --no-gradient-checkpointing --compile --activation-memory-budget 0.5 --chunk-size 2048"; do
  set -- $c; n=$1; shift
  if [ $SECONDS -gt 300 ]; then echo "skip $n (time)" | tee -a $OUT/log.txt; continue; fi
  echo "== $n: $* (t=$SECONDS s)" | tee -a $OUT/log.txt
  timeout 150 python3 bench/distill.py --preset llama31-8b-4b-width --methods naive,chunked "$@" --out $OUT/$n.json 2>&1 \
    | grep -v "could not be imported" | tail -12 | tee -a $OUT/log.txt
  echo "rc ${PIPESTATUS[0]}" | tee -a $OUT/log.txt
done
echo "total $SECONDS s" | tee -a $OUT/log.txt
