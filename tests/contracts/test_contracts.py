"""The API documents parse with their official parsers (docs/asyncapi.yaml: @asyncapi/parser).

The parsers are Node packages pinned in tests/contracts/package.json and installed by
``make contracts`` (``npm ci``, part of ``make test``). Without node or the installed packages
these tests skip on a developer's machine and fail under CI.

Every document is checked in one run of validate.mjs (the parser's start-up is ~2 s): the
project's own documents, and broken copies that show the check can fail.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VALIDATE = HERE / "validate.mjs"

# (kind, document) for every machine-readable contract the project publishes. The status
# API's OpenAPI document joins as ("openapi", ...) once validate.mjs knows that kind.
DOCUMENTS = [("asyncapi", REPO / "docs" / "asyncapi.yaml")]
ASYNCAPI = REPO / "docs" / "asyncapi.yaml"

# Broken copies of the AsyncAPI document: (name, text to replace, replacement).
BROKEN = {
    # The form the document had before: a Reference inside a Channel/Operation Bindings Object
    # is not allowed (AsyncAPI 3 allows one only for the whole bindings object).
    "reference inside bindings": (
        "    bindings:\n      $ref: '#/components/channelBindings/eventsExchange'\n",
        "    bindings:\n      amqp:\n"
        "        $ref: '#/components/channelBindings/eventsExchange/amqp'\n",
    ),
    "missing payload schema": ("job-event.schema.json", "job-evnt.schema.json"),
    "binding value outside its schema": ("        is: routingKey\n", "        is: topic\n"),
    # An older minor version is only an information: printed, not a failure.
    "older minor version": ("asyncapi: 3.1.0\n", "asyncapi: 3.0.0\n"),
}


def _parser_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        problem = "node is not on PATH"
    elif not (HERE / "node_modules" / "@asyncapi" / "parser" / "package.json").is_file():
        problem = "tests/contracts/node_modules is not installed (make contracts)"
    else:
        return node
    if IN_CI:
        pytest.fail(problem + " (CI must install it: make test runs make contracts)")
    pytest.skip(problem)


def _broken_copy(root: Path, old: str, new: str) -> Path:
    """docs/asyncapi.yaml with ``old`` replaced, beside a copy of the schemas its $refs name."""
    text = ASYNCAPI.read_text(encoding="utf-8")
    assert old in text, f"the document no longer contains {old!r}: update the broken copy"
    (root / "docs").mkdir(parents=True)
    shutil.copytree(REPO / "worker" / "wire" / "schemas", root / "worker" / "wire" / "schemas")
    copy = root / "docs" / "asyncapi.yaml"
    copy.write_text(text.replace(old, new), encoding="utf-8")
    return copy


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """validate.mjs's result for every document and broken copy, by document name."""
    node = _parser_or_skip()
    root = tmp_path_factory.mktemp("contracts")
    copies = {
        name: _broken_copy(root / f"case{i}", old, new)
        for i, (name, (old, new)) in enumerate(BROKEN.items())
    }
    found: dict[str, dict[str, Any]] = {}
    for kind in sorted({kind for kind, _ in DOCUMENTS}):
        paths = [path for k, path in DOCUMENTS if k == kind]
        if kind == "asyncapi":
            paths += copies.values()
        run = subprocess.run(
            [node, str(VALIDATE), "--json", kind, *map(str, paths)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode in (0, 1), run.stderr
        for result in json.loads(run.stdout):
            found[result["file"]] = result
    by_path = {str(path): name for name, path in copies.items()}
    return {by_path.get(file, file): result for file, result in found.items()}


def lines(result: dict[str, Any]) -> list[str]:
    return [
        f"{d['severity']} {d['code']} at {d['path']}: {d['message']}" for d in result["diagnostics"]
    ]


@pytest.mark.parametrize(("kind", "document"), DOCUMENTS, ids=[p.name for _, p in DOCUMENTS])
def test_the_document_parses_with_no_diagnostic_at_all(
    results: dict[str, dict[str, Any]], kind: str, document: Path
) -> None:
    result = results[str(document)]
    assert (result["kind"], result["parsed"]) == (kind, True)
    assert lines(result) == []
    assert result["ok"]


def test_a_reference_inside_a_bindings_object_is_refused(
    results: dict[str, dict[str, Any]],
) -> None:
    result = results["reference inside bindings"]
    assert not result["ok"]
    assert not result["parsed"]
    refused = {d["path"] for d in result["diagnostics"] if d["severity"] == "error"}
    assert {
        "channels.commandEvents.bindings.amqp",
        "channels.jobStatusEvents.bindings.amqp",
        "channels.jobProgressEvents.bindings.amqp",
    } <= refused
    assert "Referencing in this place is not allowed" in "\n".join(lines(result))


def test_a_payload_schema_that_is_not_there_is_refused(
    results: dict[str, dict[str, Any]],
) -> None:
    result = results["missing payload schema"]
    assert not result["ok"]
    assert any(
        d["code"] == "invalid-ref" and "job-evnt.schema.json" in d["message"]
        for d in result["diagnostics"]
    ), lines(result)


def test_a_binding_that_breaks_the_amqp_binding_schema_is_refused(
    results: dict[str, dict[str, Any]],
) -> None:
    result = results["binding value outside its schema"]
    assert not result["ok"]
    assert any(d["severity"] == "error" for d in result["diagnostics"]), lines(result)


def test_an_information_is_reported_but_does_not_fail(
    results: dict[str, dict[str, Any]],
) -> None:
    result = results["older minor version"]
    assert result["ok"]
    assert [(d["severity"], d["code"]) for d in result["diagnostics"]] == [
        ("info", "asyncapi-latest-version")
    ]


def test_a_document_that_fails_makes_the_exit_status_non_zero(tmp_path: Path) -> None:
    node = _parser_or_skip()
    old, new = BROKEN["reference inside bindings"]
    run = subprocess.run(
        [node, str(VALIDATE), "asyncapi", str(_broken_copy(tmp_path, old, new))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1
    assert "FAILED (3 error, 0 warning, 0 info, 0 hint)" in run.stdout
    assert "error asyncapi-document-unresolved at channels.commandEvents.bindings.amqp" in (
        run.stdout
    )
