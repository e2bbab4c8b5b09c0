"""Helpers of the browser tests: the App in a page, polling, and the
operators the flows need. Fixtures live in ``conftest.py``."""


import os
import pathlib
import re
import shutil
import socket
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PLUGIN = "@bulk-labeling/bulk_labeling"
CHROMIUM = os.environ.get("BULK_LABELING_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "artifacts" / "e2e"
DOC_IMAGES = REPO / "docs" / "images"
VIEWPORT = {"width": 1600, "height": 1000}

#: Photos per test dataset (every Nth of the offline photos, all classes)
PHOTO_STEP = 6

#: Seconds to wait for the App or the database to catch up
TIMEOUT = 30


def uri(name):
    return "%s/%s" % (PLUGIN, name)


def unavailable():
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return (
            "playwright is not installed: .venv/bin/pip install playwright "
            "(it is in the [test] extra)"
        )

    if not os.path.exists(CHROMIUM):
        return (
            "Chromium not found at %s: apt-get install -y chromium (or set "
            "BULK_LABELING_CHROMIUM)" % CHROMIUM
        )

    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppPage(object):
    """The App in a browser page, with the few gestures the tests need."""

    def __init__(self, page, session, url, test_name, errors):
        self.page = page
        self.session = session
        self.url = url
        self.test_name = test_name
        self.errors = errors
        self.shots = []

    # ------------------------------------------------------------- navigation

    def open(self, dataset):
        self.session.dataset = dataset
        self.page.goto(self.url + "/datasets/%s" % dataset.name)
        self.page.locator('[data-cy="looker-checkbox-"]').first.wait_for(
            state="attached"
        )
        self.dismiss_popups()
        return self

    def dismiss_popups(self):
        # the "Explore Enterprise" card, shown once per browser profile
        dismiss = self.page.get_by_role("button", name="Dismiss")
        try:
            dismiss.wait_for(state="visible", timeout=3000)
            dismiss.click()
        except Exception:
            pass

    def reload(self):
        self.page.reload()
        self.page.locator('[data-cy="looker-checkbox-"]').first.wait_for(
            state="attached"
        )
        self.dismiss_popups()

    # ------------------------------------------------------------------- grid

    @property
    def thumbnails(self):
        return self.page.locator('[data-cy="looker"]')

    def select(self, index, shift=False):
        """Clicks the checkbox of the index-th thumbnail of the grid."""
        thumb = self.thumbnails.nth(index)
        thumb.scroll_into_view_if_needed()
        thumb.hover()
        thumb.locator('[data-cy="looker-checkbox-"]').click(
            modifiers=["Shift"] if shift else None
        )

    def selection_count(self):
        counter = self.page.locator('[data-cy="selection-count-container"]')
        if not counter.count():
            return 0
        text = counter.first.inner_text()
        digits = re.findall(r"\d+", text)
        return int(digits[0]) if digits else 0

    def grid_action(self, name):
        """Clicks one of the plugin's buttons in the grid's actions row, or
        in its "More items" popover when the row is too narrow to show it."""
        items = self.page.locator('[data-item-id="%s"]' % uri(name))
        items.first.wait_for(state="attached")
        try:
            items.first.click(trial=True, timeout=1500)
        except Exception:
            row = self.page.locator('[data-itemid="grid-actions-row"]')
            row.locator(":scope > div").nth(1).locator("div div").last.click()
            self.page.wait_for_timeout(300)
            items.last.click()
            return

        items.first.click()

    def tags(self, field):
        """The label tags the grid draws for a field, as text."""
        return self.page.locator('[data-cy="tag-%s"]' % field).all_inner_texts()

    def entry_count(self):
        """The sample count the grid shows (the current view)."""
        text = self.page.locator('[data-cy="entry-counts"]').first.inner_text()
        digits = re.findall(r"\d[\d,]*", text)
        return int(digits[0].replace(",", "")) if digits else None

    def wait_grid(self):
        """Waits until the grid has drawn its thumbnails."""
        self.page.locator(
            '[data-cy="looker"] canvas[canvas-loaded="true"]'
        ).first.wait_for(state="attached")
        self.page.wait_for_timeout(500)

    # ------------------------------------------------------------------ modal

    def open_sample(self, index):
        """Opens the index-th sample of the grid in the sample viewer."""
        thumb = self.thumbnails.nth(index)
        thumb.scroll_into_view_if_needed()
        box = thumb.bounding_box()
        # below the selection checkbox's strip, above the label tags
        thumb.click(position={"x": box["width"] / 2, "y": box["height"] * 0.6})
        self.modal.wait_for(state="visible")

    @property
    def modal(self):
        return self.page.locator('[data-cy="modal"]').first

    def modal_action(self, icon):
        """Clicks one of the plugin's buttons in the sample viewer's actions
        row, found by its icon (``assets/<icon>.svg``): unlike the grid's,
        the viewer's buttons carry no operator id."""
        button = self.page.locator(
            'img[src$="/assets/%s.svg"]' % icon
        ).last
        button.wait_for(state="visible")
        button.click()

    # ----------------------------------------------------------------- prompt

    @property
    def prompt(self):
        return self.page.locator('[data-cy="operators-prompt-modal"]')

    def fill_autocomplete(self, placeholder, values, scope=None):
        """Enters values into a multi-value autocomplete, one chip each.

        Dynamic forms re-render while they resolve, which can swallow
        keystrokes: the whole value is set at once and checked before Enter.
        """
        scope = scope or self.prompt
        for value in values:
            box = scope.get_by_placeholder(placeholder).first
            field = box.locator(
                "xpath=ancestor::div[contains(@class, 'MuiAutocomplete-root')][1]"
            )
            chip = field.locator(".MuiChip-label", has_text=value).first
            # a re-render of the form can also drop a chip just added
            for _ in range(10):
                box.click()
                box.fill(value)
                self.page.wait_for_timeout(400)
                if box.input_value() != value:
                    continue
                box.press("Enter")
                try:
                    chip.wait_for(state="visible", timeout=5000)
                    self.page.wait_for_timeout(500)
                    if chip.is_visible():
                        break
                except Exception:
                    pass
            else:
                raise AssertionError("could not enter %r" % value)

        chips = field.locator(".MuiChip-label").all_inner_texts()
        assert sorted(chips) == sorted(values), chips

    def set_text_input(self, label, value):
        """Fills the text input that follows a form label."""
        box = self.prompt.get_by_text(label, exact=True).first.locator(
            "xpath=following::input[1]"
        )
        box.fill(str(value))

    def metadata_editor(self, label="Metadata (JSON object)"):
        """The JSON editor of a form: a plain text area (or a Monaco
        editor). The tests fail clearly when it cannot be typed in, e.g. a
        ``CodeView``, whose Monaco never loads in an offline App."""
        area = self.prompt.locator('textarea:not([aria-hidden="true"])')
        monaco = self.prompt.locator(".monaco-editor")
        try:
            wait_until(
                lambda: area.count() or monaco.count(),
                timeout=15,
                message="the metadata editor",
            )
        except AssertionError:
            raise AssertionError(
                "The '%s' editor never became editable. FiftyOne's CodeView "
                "loads the Monaco editor from cdn.jsdelivr.net at run time, "
                "which an offline App cannot reach (it stays 'Loading...'): "
                "use types.TextFieldView(multiline=True) for JSON inputs"
                % label
            )
        return area.first if area.count() else monaco.first

    def type_code(self, editor, text):
        """Replaces the text of a text area or a Monaco editor."""
        if editor.evaluate("e => e.tagName") == "TEXTAREA":
            editor.fill(text)
        else:
            editor.click()
            self.page.keyboard.press("Control+A")
            self.page.keyboard.insert_text(text)
        self.page.wait_for_timeout(500)

    def wait_for_form(self, text):
        """Waits until the prompt's form shows ``text`` (it has resolved)."""
        self.prompt.get_by_text(text).first.wait_for(state="visible")
        self.page.wait_for_timeout(300)

    def execute(self, label="Execute", output=True, until=None):
        """Clicks the prompt's execute button and waits for the operation:
        with ``output``, until the operator shows its result (returned as
        text; :meth:`close_output` closes it), else until the prompt closes.
        A generator operator shows its progress, with a "Done" button, before
        its result: ``until`` is a text of the result to wait for.
        """
        button = self.prompt.get_by_role("button", name=label, exact=True)
        button.wait_for(state="visible")
        wait_until(button.is_enabled, message="%s button enabled" % label)
        button.click()
        if not output:
            self.prompt.first.wait_for(state="hidden")
            return None

        done = self.output_done.first
        done.wait_for(state="visible")
        if until:
            self.page.locator(".MuiPaper-root", has=done).last.get_by_text(
                until).first.wait_for(state="visible")
        return self.page.locator(".MuiPaper-root", has=done).last.inner_text()

    @property
    def output_done(self):
        """The button that closes an operator's result: "Done" after a
        generator operator, "Close" after a plain one."""
        # plain <button>s in some FiftyOne releases, MUI buttons in others
        return self.page.locator("button, [role=button]").filter(
            has_text=re.compile(r"^\s*(Done|Close)\s*$")
        )

    def close_output(self):
        done = self.output_done
        if done.count():
            done.first.click()
            done.first.wait_for(state="hidden")

    # ------------------------------------------------------------------ panel

    @property
    def panel(self):
        return self.page.locator(
            '[data-cy="panel-content-bulk_labeling_panel"]'
        )

    def open_panel(self):
        self.grid_action("open_bulk_labeling_panel")
        self.panel.wait_for(state="visible")
        self.panel.get_by_text("in the dataset").first.wait_for()
        return self.panel

    def panel_button(self, name, exact=True):
        return self.panel.get_by_role("button", name=name, exact=exact)

    def set_panel_slider(self, value):
        """Sets the panel's slider (a range input) to ``value``."""
        slider = self.panel.locator('input[type="range"]').first
        slider.fill(str(value))

    # ------------------------------------------------------------ screenshots

    def shot(self, name, doc_name=None):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / ("%s.png" % name)
        self.page.screenshot(path=str(path))
        if doc_name and os.environ.get("BULK_LABELING_DOC_IMAGES"):
            DOC_IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOC_IMAGES / ("%s.png" % doc_name))
        self.shots.append(path)
        return path


def wait_until(condition, timeout=TIMEOUT, interval=0.25, message=None):
    """Polls ``condition()`` until it is truthy; returns its value."""
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(
                "Timed out after %ss waiting for %s"
                % (timeout, message or condition)
            )
        time.sleep(interval)


def operator_registered(name):
    from fiftyone.operators.registry import OperatorRegistry

    return any(op.uri == uri(name) for op in OperatorRegistry().list_operators())


def require_operator(name):
    """Skips a test whose flow needs an operator not registered yet."""
    if not operator_registered(name):
        pytest.skip(
            "operator %s is not registered yet (it is being built in "
            "another issue)" % uri(name)
        )


def tiny_clip():
    """``(checkpoint, config)`` of the tiny CLIP that the smart-search tests
    use (no CLIP weights can be downloaded here); trained once if missing,
    see ``scripts/train_tiny_clip.py``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_tiny_clip", REPO / "scripts" / "train_tiny_clip.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt, config = module.ensure_model()
    return str(ckpt), str(config)
