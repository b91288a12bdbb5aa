#!/usr/bin/env bash
# Container entrypoint: make sure the weights are in place, then run the command.
#
#   CINERAY_WEIGHTS_URI=s3://bucket/cineray-tiny   fetch the exported components from S3 into
#                                                  $CINERAY_WEIGHTS_DIR (skipped when that copy
#                                                  is already complete)
#   unset                                          use what the image baked in
#
# With no command it only fetches: KubeRay runs a container's own command before the `ray start`
# it generates ("<command> && ray start ..."), so pods set `command: [this script]`.
set -euo pipefail
if [[ -n "${CINERAY_WEIGHTS_URI:-}" ]]; then
  python "$(dirname "$0")/fetch_weights.py" "${CINERAY_WEIGHTS_URI}" \
    "${CINERAY_WEIGHTS_DIR:-/models/cineray-tiny}"
fi
if [[ $# -gt 0 ]]; then
  exec "$@"
fi
