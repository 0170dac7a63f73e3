"""The portal in a real browser: Debian's Chromium driven by Playwright against
pytest-django's live server (a real HTTP server on a thread, real PostgreSQL underneath).

A contributor signs up, describes an adapter, uploads a real PEFT adapter through the file
input, sees it validated, then uploads a pickle and sees the refusal and its code. Both
pages are saved as screenshots under var/screenshots/ for people to look at.
"""

from __future__ import annotations

import re

import pytest

from contributions.models import AdapterVersion, ApiToken
from tests.browser.conftest import BROWSER_MARKS, SCREENSHOTS
from tests.support.crafted import real_adapter

playwright_sync = pytest.importorskip("playwright.sync_api")


pytestmark = BROWSER_MARKS


def test_a_contributor_signs_up_creates_an_adapter_and_uploads_it(
    page, live_server, base_model, tmp_path
):
    expect = playwright_sync.expect
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    # Sign up through the form; it logs the new contributor in.
    page.goto(f"{live_server.url}/")
    expect(page.get_by_role("heading", name="The base model")).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "portal-home.png"), full_page=True)
    page.get_by_role("link", name="Sign up to contribute").click()
    page.get_by_label("Username").fill("ada")
    page.get_by_label("Email").fill("ada@example.org")
    page.get_by_label("Display name").fill("Ada L.")
    page.get_by_label("Affiliation").fill("Analytical Engines")
    page.get_by_label("Password", exact=True).fill("a long enough passphrase 42")
    page.get_by_label("Password again").fill("a long enough passphrase 42")
    page.get_by_role("button", name="Sign up").click()
    expect(page.get_by_role("heading", name="My adapters")).to_be_visible()
    expect(page.get_by_text("Signed in as")).to_contain_text("ada")

    # Describe an adapter.
    page.get_by_role("link", name="New adapter").first.click()
    page.get_by_label("Slug").fill("adder")
    page.get_by_label("Title").fill("Three-digit adder")
    page.get_by_label("Description").fill("Adds three-digit numbers exactly.")
    page.get_by_label("Task tags").fill("math, arithmetic")
    page.get_by_label("Languages").fill("en")
    page.get_by_label("License").select_option("Apache-2.0")
    page.get_by_label("Intended use").fill("Answer addition questions.")
    page.get_by_label("Training data summary").fill("Synthetic sums, generated.")
    page.get_by_label("Example prompts").fill(
        "What is 123 + 456?\nAdd 700 and 12.\nCompute 5 + 999."
    )
    page.get_by_role("button", name="Create adapter").click()
    expect(page.get_by_role("heading", name=re.compile("Upload a version"))).to_be_visible()

    # Upload the two files of a real PEFT adapter through the one multiple-file input.
    files = real_adapter().files()
    paths = []
    for name, data in files.items():
        path = tmp_path / name
        path.write_bytes(data)
        paths.append(path)
    page.get_by_label("Adapter files").set_input_files(paths)
    page.get_by_role("button", name="Upload and check").click()
    expect(page.get_by_role("status")).to_contain_text("Version 1 uploaded: status queued")
    expect(page.locator("table .badge.status-queued")).to_have_text("queued")
    expect(page.get_by_role("heading", name="Version 1 queued")).to_be_visible()
    version = AdapterVersion.objects.get(adapter__slug="adder")
    assert version.status == AdapterVersion.Status.QUEUED
    expect(page.get_by_text(version.weights_sha256[:12])).to_be_visible()
    page.screenshot(path=str(SCREENSHOTS / "portal-adapter.png"), full_page=True)

    # A pickle is refused: the code is on the page and nothing is stored.
    page.get_by_role("link", name="Upload a version").click()
    pickle_path = tmp_path / "adapter_model.bin"
    pickle_path.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.")
    page.get_by_label("Adapter files").set_input_files(
        [tmp_path / "adapter_config.json", pickle_path]
    )
    page.get_by_role("button", name="Upload and check").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("Refused (upload_pickle_refused)")
    expect(alert).to_contain_text("Nothing was stored")
    page.screenshot(path=str(SCREENSHOTS / "portal-upload-refused.png"), full_page=True)
    assert AdapterVersion.objects.count() == 1

    # Withdraw it again from the adapter page, with a reason.
    page.get_by_role("link", name="Three-digit adder").first.click()
    page.get_by_label("Reason for withdrawing v1").fill("Trained on the test split by mistake.")
    page.get_by_role("button", name="Withdraw v1").click()
    expect(page.get_by_role("status")).to_contain_text("Version 1 withdrawn")
    expect(page.get_by_text("Trained on the test split by mistake.")).to_be_visible()
    version.refresh_from_db()
    assert version.status == AdapterVersion.Status.WITHDRAWN
    page.get_by_role("link", name="My adapters").first.click()
    expect(page.locator("table .badge.status-withdrawn")).to_have_text("withdrawn")
    page.screenshot(path=str(SCREENSHOTS / "portal-dashboard.png"), full_page=True)

    # An API token: the key is shown on the response page once, never again.
    page.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("laptop CLI")
    page.get_by_role("button", name="Create token").click()
    key = page.get_by_label("API key").input_value()
    assert re.fullmatch(r"tsr_[0-9a-f]{8}_[A-Za-z0-9_-]{20,}", key)
    expect(page.locator("pre.code").first).to_contain_text(f"Bearer {key}")
    # The page also shows how to call the inference API with the new key.
    expect(page.locator("pre.code", has_text="from openai import OpenAI")).to_contain_text(key)
    page.screenshot(path=str(SCREENSHOTS / "portal-tokens.png"), full_page=True)
    page.get_by_role("link", name="API tokens").click()  # a fresh GET: the key is gone
    expect(page.get_by_label("API key")).to_have_count(0)
    assert key not in page.content()
    expect(page.get_by_role("cell", name=f"tsr_{key.split('_')[1]}_…")).to_be_visible()
    assert ApiToken.objects.filter(user__username="ada").count() == 1
