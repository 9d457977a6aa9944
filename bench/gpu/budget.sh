# shellcheck shell=bash
# Sourced by the CUDA scripts: one time budget for a whole lease. check.sh exports MAT_DEADLINE
# (epoch seconds); every long command then runs through `within`, so a script cut short by the
# budget stops at a command boundary with what it has written so far, and the parts after it
# are recorded as skipped, not lost in a killed run.
#
#   within CAP CMD...   runs CMD under `timeout` for CAP seconds, or fewer to end by MAT_DEADLINE;
#                       does not start it (returns 124, says so on stderr) with under
#                       MAT_MIN_SECONDS (default 15) left.
#   seconds_left        the seconds to MAT_DEADLINE (a large number when there is none).
seconds_left() {
  if [ -n "${MAT_DEADLINE:-}" ]; then echo $(( MAT_DEADLINE - $(date +%s) )); else echo 1000000; fi
}
within() {
  local cap=$1 left
  shift
  left=$(seconds_left)
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt "${MAT_MIN_SECONDS:-15}" ]; then
    echo "skipped for time (${left} s left): $*" >&2
    return 124
  fi
  timeout "$cap" "$@"
}
