# Third: chunk size with gradient checkpointing (compiled chunk), eager and compiled layers.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
for c in "N --chunk-size 2048" "O --compile --chunk-size 2048" "P --compile --chunk-size 4096"; do
  set -- $c; n=$1; shift
  echo "== $n: $* (t=$SECONDS s)" | tee -a $OUT/log3.txt
  timeout 150 python3 bench/distill.py --preset llama31-8b-4b-width --methods naive,chunked "$@" --out $OUT/$n.json 2>&1 \
    | grep -v "could not be imported" | tail -12 | tee -a $OUT/log3.txt
done
echo "total $SECONDS s" | tee -a $OUT/log3.txt
