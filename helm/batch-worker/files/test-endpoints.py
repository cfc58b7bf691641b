# `helm test`: the Service answers /healthz and /metrics as a worker does. Run by
# templates/tests/test-endpoints.yaml with the worker image's Python (stdlib only).
import os
import sys
import time
import urllib.error
import urllib.request

BASE = os.environ["BASE_URL"]
# The Service routes to ready pods only: right after an install there may be none yet.
ATTEMPTS, PAUSE = 10, 3


def fetch(path):
    """(status, body); retries only while nothing answers."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(BASE + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            print(f"{path}: {exc} (attempt {attempt} of {ATTEMPTS})", flush=True)
            if attempt < ATTEMPTS:
                time.sleep(PAUSE)
    sys.exit(f"FAIL {path}: no answer from {BASE}")


for path, expected in (("/healthz", "ok"), ("/metrics", "batch_worker_build_info")):
    status, body = fetch(path)
    if status != 200 or expected not in body:
        sys.exit(f"FAIL {path}: {status} {body[:200].strip()!r}, expected 200 with {expected!r}")
    print(f"ok {path}", flush=True)
