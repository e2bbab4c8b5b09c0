"""Browser fixtures: the real FiftyOne App, with the plugin loaded, driven by
Playwright and Debian's Chromium.

``tests/conftest.py`` has already isolated the database and the plugins dir
(a symlink to this checkout) before fiftyone was imported; the App server
that :func:`fiftyone.launch_app` starts inherits that environment.

The tests skip, with the reason, when Playwright or Chromium is missing::

    apt-get install -y chromium
    .venv/bin/pip install playwright     # never `playwright install`

Screenshots go to ``artifacts/e2e/`` (git-ignored). With
``BULK_LABELING_DOC_IMAGES=1`` the ones the docs use are also copied to
``docs/images/``.
"""

import uuid

import pytest

import fiftyone as fo

from .helpers import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    PHOTO_STEP,
    TIMEOUT,
    VIEWPORT,
    AppPage,
    free_port,
    unavailable,
    wait_until,
)


@pytest.fixture(scope="session")
def browser():
    reason = unavailable()
    if reason:
        pytest.skip(reason)

    # screenshots of failures from an earlier run would mislead
    for stale in ARTIFACTS.glob("FAILED-*.png"):
        stale.unlink()

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield b
        b.close()


class AppServer(object):
    """The App server of the test session; each test points it at its own
    dataset. :meth:`connected` replaces a server whose session lost its
    connection for good (seen on 2 busy cores), so one drop cannot fail
    every later test."""

    def __init__(self):
        self.session = None
        self.url = None

    def start(self):
        port = free_port()
        self.session = fo.launch_app(port=port, remote=True, auto=False)
        self.url = "http://127.0.0.1:%d" % port
        # the session's client connects in the background once it is up
        wait_until(self._is_connected, timeout=90, interval=0.5,
                   message="the App server to start")

    def _is_connected(self):
        return getattr(self.session._client, "_connected", True)

    def connected(self):
        try:
            # the client retries by itself every 10 s after a drop
            wait_until(self._is_connected, timeout=25, interval=0.5)
        except AssertionError:
            self.close()
            self.start()
        return self.session, self.url

    def close(self):
        try:
            self.session.close()
        except Exception:
            pass


@pytest.fixture(scope="session")
def app_session(browser):
    server = AppServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def photos():
    from bulk_labeling.demo_data import export_photos

    found = export_photos()
    if not found:
        pytest.skip("no offline photos (apt-get install tuxpaint-stamps-default)")
    return found[::PHOTO_STEP]


@pytest.fixture
def photo_dataset(photos):
    """A fresh dataset of real photos, with their class in ``ground_truth``."""
    ds = fo.Dataset("e2e-%s" % uuid.uuid4().hex[:8])
    ds.add_samples(
        [
            fo.Sample(filepath=path, ground_truth=fo.Classification(label=cls))
            for path, cls in photos
        ]
    )
    yield ds
    if fo.dataset_exists(ds.name):
        ds.delete()


@pytest.fixture
def app(browser, app_session, request):
    """A fresh browser page on the App."""
    session, url = app_session.connected()
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(TIMEOUT * 1000)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    helper = AppPage(page, session, url, request.node.name, errors)
    yield helper
    context.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # the screenshot of a failure, taken while its dataset still exists
    helper = getattr(item, "funcargs", {}).get("app")
    if report.when == "call" and report.failed and helper is not None:
        try:
            helper.shot("FAILED-" + item.name)
        except Exception:
            pass


