# shellcheck shell=bash
# Helpers shared by the launch/ scripts; each sources this file right after `set -euo pipefail`:
#   # shellcheck source=SCRIPTDIR/common.sh
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# Defines REPO, DRY_RUN and MAIN_ARGS; a script's own options go in its parse_option (see parse_args).

# The script that sourced this file: its header comment is its usage, its name prefixes its errors.
LAUNCH_SCRIPT="${BASH_SOURCE[1]}"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
MAIN_ARGS=()

# Prints the script's header comment (line 2 up to `set -euo pipefail`) and exits with $1 (default 0).
usage() {
  sed -n '2,/^set -euo/p' "$LAUNCH_SCRIPT" | sed '$d; s/^# \{0,1\}//'
  exit "${1:-0}"
}

die() {
  echo "launch/$(basename "$LAUNCH_SCRIPT"): error: $*" >&2
  exit 2
}

# Shell-quotes one word readably: bare when safe, else in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Quotes every argument and prints them on one line, separated by spaces.
quote_all() {
  local words=() word
  for word in "$@"; do
    words+=("$(quote "$word")")
  done
  echo "${words[*]}"
}

# Runs a command, or prints it (copy-pastable) with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_all "$@"
  else
    "$@"
  fi
}

# Parses the command line: --dry-run, -h/--help and `-- ARGS` (into MAIN_ARGS) here, everything else with
# the script's parse_option WORD, which returns non-zero for a word it does not know.
parse_args() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage 0 ;;
      --)
        shift
        MAIN_ARGS=("$@")
        break
        ;;
      *) parse_option "$1" || die "unknown option $1 (see --help)" ;;
    esac
    shift
  done
}

# Dies unless training arguments came after --.
require_main_args() {
  [[ ${#MAIN_ARGS[@]} -gt 0 ]] ||
    die "${1:-give the training arguments after --, e.g. -- --config=configs/mae_vitb.py --workdir=DIR}"
}
