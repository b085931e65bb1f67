# Sourced by the README commands: point netlite at the data that sits beside
# the repository (../shared/datasets) unless NETLITE_DATA is already set.
# netlite itself never looks outside the repo except through such settings.
if [ -z "${NETLITE_DATA:-}" ]; then
  _here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  if [ -d "$_here/../shared/datasets" ]; then
    NETLITE_DATA="$(cd "$_here/../shared/datasets" && pwd)"
    export NETLITE_DATA
  fi
  unset _here
fi
