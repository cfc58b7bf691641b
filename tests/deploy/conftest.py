from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_support import CHART, import_tool


@pytest.fixture(scope="module")
def helm() -> types.ModuleType:
    return import_tool("helm_python")


@pytest.fixture(scope="module")
def kubernetes_validate() -> Iterator[types.ModuleType]:
    module = import_tool("kubernetes_validate")
    # validate() reads and parses the version's 1.8 MB definitions file on every call, 5/6 of
    # its time; the parsed schemas are only read, so one parse per file does.
    utils = module.utils
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "schema_contents", functools.lru_cache(utils.schema_contents))
        yield module


@pytest.fixture(scope="module")
def chart(helm: types.ModuleType) -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded
