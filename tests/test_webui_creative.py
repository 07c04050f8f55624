"""The web UI's creative controls in a real headless browser against the real server: one job
with an end image, one with a timed prompt (fixtures and helpers: tests/test_webui.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_webui import (  # noqa: F401
    browser,
    field,
    page,
    set_fields,
    upload,
    wait_for_status,
    web_ui,
    webui_output_dir,
)

from client.images import load_image
from client.provenance import file_sha256, read_record
from client.webui import CREATIVE_GROUP
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "webui-creative.png"
# Window 3 at 0.8 s: 2 sections of 12 frames + the start frame.
SMALL = {"Video length (seconds)": 0.8, "Steps": 1, "Resolution": 128, "Latent window size": 3}


def wait_for_done(browser_page, jobs: int) -> str:
    """The status once `jobs` jobs of this page have finished (window.seen: test_webui's RECORDER)."""
    browser_page.wait_for_function(
        "n => window.seen.status.filter(s => s.startsWith('Done')).length >= n", arg=jobs, timeout=120_000
    )
    return [s for s in browser_page.evaluate("window.seen.status") if s.startswith("Done")][jobs - 1]


@pytest.mark.server
def test_a_job_with_an_end_image_then_one_with_a_timed_prompt(page, tmp_path, webui_output_dir):  # noqa: F811
    end = tmp_path / "end.png"
    Image.fromarray(255 - load_image(SAMPLE).pixels).save(end)
    page.get_by_role("button", name=CREATIVE_GROUP).click()  # folded: its fields are made when opened
    set_fields(page, {**SMALL, "Prompt blend sections": 1})
    field(page, "Prompt").fill("[0s: The person stands] [9s: waves]")  # past the video: refused
    page.get_by_role("button", name="Start").click()
    assert wait_for_status(page, "Error").startswith("Error: INVALID_ARGUMENT: prompt='[9s: waves]'")

    field(page, "Prompt").fill("[0s: The person stands still.] [0.5s: The person waves.]")
    page.get_by_role("button", name="Start").click()
    assert wait_for_done(page, 1).startswith("Done: 25 frames")

    upload(page, page.locator("#end-image input[type=file]"), end)
    set_fields(page, {"End image strength": 0.9})
    page.get_by_role("button", name="Start").click()
    assert wait_for_done(page, 2).startswith("Done: 25 frames")
    # Its record keeps the end image's file too (the uploaded copy, the same bytes), so `--from` repeats it.
    latest = max(webui_output_dir.rglob("framepack_seed*.json"), key=lambda path: path.stat().st_mtime)
    record = read_record(latest)
    assert record["inputs"] == ["end_image", "image"] and record["end_image"]["sha256"] == file_sha256(end)
    assert record["image"]["sha256"] == file_sha256(SAMPLE)

    page.screenshot(path=tmp_path / "webui.png", full_page=True)
    assert (tmp_path / "webui.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FRAMEPACK_UPDATE_SCREENSHOT"):  # refresh the README's picture
        shutil.copyfile(tmp_path / "webui.png", SCREENSHOT)
