"""The status pages in a real browser: Debian's Chromium, headless, driven by selenium
through Debian's chromedriver, against the whole product (worker process, RabbitMQ,
PostgreSQL, the simulator, the S3 emulator).

``make test`` installs chromium and chromium-driver where they are missing (``make
browser``). With ``BATCH_WORKER_TEST_SCREENSHOT=PATH`` the job page is saved there while
its job runs (the README's picture: docs/img/job-page.png), and the fleet page beside it
(fleet-page.png).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.web.web_support")

from tests.cli_support import Events, Producer, Stack, WorkerProcess  # noqa: E402
from tests.conftest import IN_CI  # noqa: E402
from tests.e2e.conftest import FAST  # noqa: E402
from tests.web.web_support import get, web_server  # noqa: E402
from worker.simulator import Running, SimulatorConfig, start_background  # noqa: E402

pytest_plugins = ("tests.cli_support",)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

StartWorker = Callable[..., WorkerProcess]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
STATUSES = ("DONE", "FATAL", "PENDING")


@pytest.fixture
def simulator() -> Iterator[Running]:
    """Slower than the other tests' simulator: the job runs long enough for the page to
    watch it move."""
    with start_background(SimulatorConfig(**{**FAST, "speed": 40.0})) as running:
        yield running


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = "Debian's chromium and chromium-driver are not installed (make browser)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="bw-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(what: str, predicate: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:g} s: {what}")


def map_counts(driver: Any) -> dict[str, int]:
    """Features drawn on the map, by the status class Leaflet gave their paths."""
    counts: dict[str, int] = driver.execute_script(
        "const out = {};"
        "for (const s of arguments[0]) out[s] = document.querySelectorAll("
        "  '#map path.feature-' + s).length;"
        "return out;",
        list(STATUSES),
    )
    return counts


def legend(driver: Any) -> dict[str, int]:
    return {s: int(driver.find_element("id", f"count-{s}").text) for s in STATUSES}


def test_the_job_map_follows_a_running_job_and_the_fleet_page_shows_it(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer, browser: Any
) -> None:
    start_worker()
    job = stack.payload("max-ndvi-geotiff.json", features=24)
    job["request"]["description"] += " [sim:fatal=4]"
    producer.publish(job)
    events.wait_for(
        lambda: "PROCESSING" in events.statuses(job["job_id"]), timeout=120, what="PROCESSING"
    )

    with web_server(stack) as server:
        browser.get(f"{server.url}job?id={job['job_id']}")
        wait_until("the job page loads", lambda: browser.find_element("tag name", "body")
                   .get_attribute("data-loaded"))  # fmt: skip
        # Live: the page itself sees features still PENDING, then the job's end, unreloaded.
        running = wait_until(
            "the map shows the job part done",
            lambda: (counts := map_counts(browser))["PENDING"] and counts,
        )
        assert sum(running.values()) == 24
        shot = os.environ.get("BATCH_WORKER_TEST_SCREENSHOT")
        if shot:
            wait_until("some features done", lambda: map_counts(browser)["DONE"] >= 6, 60)
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(shot)
        events.wait_terminal(job["job_id"], timeout=180)
        final = wait_until(
            "the page shows the job DONE",
            lambda: (
                browser.find_element("tag name", "body").get_attribute("data-status") == "DONE"
                and map_counts(browser)["PENDING"] == 0
                and map_counts(browser)
            ),
        )
        assert final == {"DONE": 20, "FATAL": 4, "PENDING": 0}
        assert legend(browser) == final
        api = get(server, f"/api/v1/jobs/{job['job_id']}/features").json()
        assert api["counts"] == final
        # Without a basemap: the outlines shipped with the package and a graticule.
        assert browser.find_elements("css selector", "#map path.country")
        assert browser.find_elements("css selector", "#map path.graticule")
        assert browser.find_element("id", "field-status").text == "DONE"
        timeline = browser.find_elements("css selector", "#timeline li")
        detail = get(server, f"/api/v1/jobs/{job['job_id']}").json()
        assert len(timeline) == len(detail["events"])
        assert browser.find_elements("css selector", "#chart polyline")

        browser.get(server.url)
        wait_until("the fleet page loads", lambda: browser.find_element("tag name", "body")
                   .get_attribute("data-loaded"))  # fmt: skip
        if shot:
            browser.save_screenshot(str(Path(shot).with_name("fleet-page.png")))
        row = browser.find_element("css selector", '#by-status tr[data-status="DONE"]')
        assert row.find_elements("tag name", "td")[1].text == "1"
        link = browser.find_element("css selector", f'#jobs tr[data-job="{job["job_id"]}"] a')
        link.click()
        wait_until("the link opens the job page", lambda: legend(browser) == final)
        problems = [
            entry
            for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon" not in entry["message"]
        ]
        assert problems == []
