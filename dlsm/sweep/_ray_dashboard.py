"""Ray's dashboard process without its cloud-metadata probe; :mod:`dlsm.sweep.cluster` runs it when a sweep
asks for the dashboard (``sweep.dashboard = True``).

``python -m dlsm.sweep._ray_dashboard <ray>/dashboard/dashboard.py --host=127.0.0.1 ...`` replaces
``usage_lib.get_cloud_from_metadata_requests`` (HTTP to 169.254.169.254 and metadata.google.internal,
called by the dashboard's usage-stats module even with usage stats off) by the answer it gives
off-cloud, ``'unknown'``, then runs Ray's dashboard script unchanged.
"""

import runpy
import sys

from ray._common.usage import usage_lib

usage_lib.get_cloud_from_metadata_requests = lambda: "unknown"

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
