# Shared by the experiment scripts: run NAME OVERRIDES... into $OUT/NAME with $CONFIG, or continue it from its
# last checkpoint if an earlier attempt was interrupted; a finished run is skipped.
run() {
  local name=$1; shift
  if [ -d "$OUT/$name/global" ]; then return; fi  # written last, atomically: the run is finished
  if [ -f "$OUT/$name/config.yaml" ]; then
    "$FEDLORA" run --resume "$OUT/$name" --no-progress >> "$OUT/$name.log" 2>&1
  else
    "$FEDLORA" run "$CONFIG" "$@" --output "$OUT/$name" --no-progress > "$OUT/$name.log" 2>&1
  fi
}
