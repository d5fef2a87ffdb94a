"""The images' HEALTHCHECK: GET http://127.0.0.1:PORT/healthz, exit 0 when it answers 200.

PORT is the first argument, else ``SLUICE_HTTP_PORT``, else 9400 (the gateway passes its
``SLUICE_GATEWAY_PORT``). Standard library only: it runs with the image's Python.
"""

import os
import sys
import urllib.error
import urllib.request

port = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SLUICE_HTTP_PORT", "9400")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError) as exc:
    print(f"healthz on port {port}: {exc}", file=sys.stderr)
    sys.exit(1)
