# Shared helpers for the launch scripts (sourced, not run).
# `run CMD...` prints the command; executes it unless DRY_RUN=1.
DRY_RUN=${DRY_RUN:-0}
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}
parse_dry_run() {
  for a in "$@"; do if [ "$a" = "--dry-run" ]; then DRY_RUN=1; fi; done
}
strip_dry_run() {
  local out=(); for a in "$@"; do if [ "$a" != "--dry-run" ]; then out+=("$a"); fi; done
  printf '%s\0' "${out[@]}"
}
