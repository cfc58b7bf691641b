"""Where the service writes a batch request's artifacts (batch-v2-api.md §8).

The feature manifest (after analysis) and the execution database (during processing) sit in
the "root folder of the delivery path". Shared by the simulator (which writes them) and the
worker (which reads tile counts from them).
"""

from __future__ import annotations

import re
from typing import Any

FEATURE_MANIFEST = "featureManifest-{id}.gpkg"
EXECUTION_DB = "execution-{id}.sqlite"

_PLACEHOLDER = re.compile(r"<[^>]*>")


def delivery_url(request: dict[str, Any]) -> str | None:
    """The ``output.delivery.s3.url`` of a create payload (or of a task's ``request``)."""
    output = request.get("output")
    if not isinstance(output, dict):
        return None
    delivery = output.get("delivery")
    if not isinstance(delivery, dict):
        return None
    s3 = delivery.get("s3")
    if not isinstance(s3, dict):
        return None
    url = s3.get("url")
    return url if isinstance(url, str) else None


def delivery_base(url: str, request_id: str) -> str:
    """The root folder of a delivery path (§8.4, a port of the service's own rule).

    ``s3://b/folder`` → ``s3://b/folder/<id>``;
    ``s3://b/data/<tileName>/<outputId>.<format>`` → ``s3://b/data``.
    """
    url = url.rstrip("/")
    if not _PLACEHOLDER.search(url):
        url = f"{url}/<requestId>"
    url = url.replace("<requestId>", request_id)
    scheme, sep, rest = url.partition("://")
    segments = rest.split("/")
    kept: list[str] = []
    for segment in segments:
        if "<" in segment:
            break
        kept.append(segment)
    return f"{scheme}{sep}{'/'.join(kept)}"


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` → (``bucket``, ``a/b``)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// url: {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    return bucket, key


def artifact_keys(url: str, request_id: str) -> tuple[str, str, str]:
    """(bucket, feature manifest key, execution database key) of a request."""
    bucket, prefix = split_s3_url(delivery_base(url, request_id))
    prefix = f"{prefix}/" if prefix else ""
    return (
        bucket,
        prefix + FEATURE_MANIFEST.format(id=request_id),
        prefix + EXECUTION_DB.format(id=request_id),
    )
