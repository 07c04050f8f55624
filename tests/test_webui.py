"""The web UI: its job logic on its own, and the whole page in a real headless browser
(Debian's chromium driven by Playwright) against the real tritonserver with the tiny model."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import FAST_SETTINGS
from PIL import Image

from client import stream
from client.cli import main
from client.images import load_image
from client.progress import JobClock, plan_text, queued_text
from client.video import FrameAssembler
from client.webui_job import StopSignals, progress_text, run_job
from framepack_backend.presets import PRESETS
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_server.server import free_ports
from framepack_wire import WireRequest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "webui.png"
# Playwright never downloads a browser here: it drives the distribution's chromium.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 60_000

# Records every value the status box, the preview and the video take, from inside the
# page: polling from the test process could miss the fast steps of the tiny model.
RECORDER = """() => {
    window.seen = {status: [], preview: [], video: []};
    const note = (list, value) => { if (value && list[list.length - 1] !== value) list.push(value); };
    setInterval(() => {
        note(window.seen.status, document.querySelector('#status textarea')?.value);
        note(window.seen.preview, document.querySelector('#preview img')?.getAttribute('src'));
        note(window.seen.video, document.querySelector('#video video')?.getAttribute('src'));
    }, 5);
}"""


# --- the job logic, no browser -------------------------------------------------------


def test_progress_text_counts_steps_over_all_sections_for_the_eta():
    event = stream.Progress(section=2, sections=3, step=1, steps=4, elapsed_s=50.0, preview=None)
    # 5 of 12 steps in 50 s: 7 steps left take about 70 s.
    assert progress_text(event) == "Section 2/3 · step 1/4 · 0:50 elapsed · ETA 1:10"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_the_eta_counts_the_remaining_decodes_once_one_was_measured():
    """2 sections × 4 steps at 1 s a step; the first decode takes 3 s, so the last one is expected to."""
    now = FakeClock()
    job = JobClock(now)

    def at(t, event):
        now.t = t
        job.update(event)

    at(0, stream.Plan(2, 9, 19, 73, 30, 144, 112))
    at(0, stream.Phase("text", 0, 2, 0.0))
    assert job.text() == "Encoding the prompt · 0:00 elapsed"  # nothing timed yet: no ETA
    at(1, stream.Phase("image", 0, 2, 1.0))
    at(2, stream.Phase("sampling", 1, 2, 2.0))
    assert job.phase_text() == "Section 1/2 · sampling"
    for step in (1, 2):
        at(2 + step, stream.Progress(1, 2, step, 4, 2.0 + step, None))
    # 6 steps left at 1 s; no decode measured yet, so the text says the decodes come on top
    assert job.text() == "Section 1/2 · step 2/4 · 0:04 elapsed · ETA 0:06 + decoding"
    for step in (3, 4):
        at(2 + step, stream.Progress(1, 2, step, 4, 2.0 + step, None))
    at(6, stream.Phase("decode", 1, 2, 6.0))
    assert job.text() == "Section 1/2 · decoding · 0:06 elapsed · ETA 0:04 + decoding"
    at(9, stream.Section(1, 2, 37, 73, 30, np.zeros((36, 2, 2, 3), np.uint8)))
    at(9, stream.Phase("sampling", 2, 2, 9.0))
    at(10, stream.Progress(2, 2, 1, 4, 10.0, None))
    assert job.text() == "Section 2/2 · step 1/4 · 0:10 elapsed · ETA 0:06"  # 3 steps + one 3-s decode
    for step in (2, 3, 4):
        at(10 + step - 1, stream.Progress(2, 2, step, 4, 9.0 + step, None))
    at(13, stream.Phase("decode", 2, 2, 13.0))
    now.t = 14
    assert job.text() == "Section 2/2 · decoding · 0:13 elapsed · ETA 0:02"  # 1 s into a 3-s decode


def test_a_plan_and_a_queue_position_read_as_sentences():
    assert plan_text(stream.Plan(1, 9, 10, 37, 30, 144, 112)) == (
        "video: 37 frames = 1.23 s (1 section of 9 latent frames) at 144×112")
    assert plan_text(stream.Plan(4, 9, 37, 145, 30, 832, 480)) == (
        "video: 145 frames = 4.83 s (4 sections of 9 latent frames) at 832×480")
    assert queued_text(stream.Queued(1, 65.0)) == "Queued on the server (next in line), waiting for 1:05"
    assert queued_text(stream.Queued(3, 5.0)) == "Queued on the server (2 jobs ahead of it), waiting for 0:05"


def test_stop_signals_reach_only_the_session_s_current_job():
    stops = StopSignals()
    first = stops.start("a")
    other = stops.start("b")
    assert stops.stop("a") and first.is_set() and not other.is_set()
    stops.finish("a", first)
    assert not stops.stop("a")  # no job runs for "a" any more
    newer = stops.start("b")
    stops.finish("b", other)  # an older job ending leaves the newer one's flag in place
    assert stops.stop("b") and newer.is_set()


def test_the_video_so_far_is_the_run_of_frames_received():
    # Inverted sampling: sections arrive from the end; a later one rewrites the overlap.
    assembler = FrameAssembler()
    frames = lambda value, count: np.full((count, 4, 6, 3), value, dtype=np.uint8)  # noqa: E731
    assembler.add(37, frames(1, 36), 73)
    assert assembler.received().shape == (36, 4, 6, 3) and (assembler.received() == 1).all()
    assembler.add(0, frames(2, 40), 73)
    so_far = assembler.received()
    assert len(so_far) == 73 and (so_far[:40] == 2).all() and (so_far[40:] == 1).all()


@pytest.mark.slow
def test_a_server_that_is_down_gives_a_clear_message(tmp_path):
    (port,) = free_ports(1)
    job = WireRequest(load_image(SAMPLE).pixels, "x", {})
    updates = list(run_job(f"127.0.0.1:{port}", job, tmp_path, lambda: False))
    assert updates[-1].status.startswith(f"Error: UNAVAILABLE: cannot reach the server at 127.0.0.1:{port}")
    assert updates[-1].final is None and list(tmp_path.iterdir()) == []


def test_a_job_shows_a_server_that_is_down_at_once(tmp_path):
    (port,) = free_ports(1)
    job = WireRequest(load_image(SAMPLE).pixels, "x", {})
    started = time.monotonic()
    updates = run_job(f"127.0.0.1:{port}", job, tmp_path, lambda: False)
    assert next(updates).status == f"Connecting to 127.0.0.1:{port}…"
    retrying = next(updates).status
    assert time.monotonic() - started < 2  # not after the whole connect timeout
    assert re.fullmatch(rf"Cannot reach the server at 127\.0\.0\.1:{port} \(.+\); retrying for up to \d+ s…",
                        retrying), retrying
    updates.close()
    assert list(tmp_path.iterdir()) == []


def test_ui_refuses_a_busy_port_in_one_line_before_serving(capsys):
    (server_port,) = free_ports(1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        code = main(["ui", "--server", f"127.0.0.1:{server_port}", "--port", str(port)])
    assert code == 2 and time.monotonic() - started < 2  # before asking any server
    assert capsys.readouterr().err.splitlines() == [
        f"framepack: error: --host 127.0.0.1 --port {port}: the port is in use; choose another with --port"
    ]


@pytest.mark.slow
def test_framepack_ui_exits_with_the_error_when_the_server_is_down(capsys):
    pytest.importorskip("gradio")
    server_port, ui_port = free_ports(2)
    assert main(["ui", "--server", f"127.0.0.1:{server_port}", "--port", str(ui_port)]) == 1
    assert capsys.readouterr().err.startswith(
        f"framepack: error: UNAVAILABLE: cannot reach the server at 127.0.0.1:{server_port}"
    )


@pytest.mark.slow
def test_the_web_ui_imports_neither_torch_nor_the_engine():
    pytest.importorskip("gradio")
    check = (
        "import sys, client.cli, client.webui; print([m for m in ('torch', 'framepack_backend') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- the page in a browser, against the real server (marked `server`) -----------------


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM}: install Debian's (apt-get install -y chromium; `make test` does)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def webui_output_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("webui")


def finished_videos(output_dir: Path) -> set[Path]:
    """The finished MP4s under the page's output folder. The folder is also Gradio's cache, so
    uploaded clips land there, and a job's last partial MP4 is deleted only after the page
    already shows "Done"."""
    return set(output_dir.rglob("framepack_seed*.mp4"))


@pytest.fixture(scope="module")
def web_ui(triton_server, webui_output_dir) -> str:
    """The page for the test server, served on a free port as `framepack ui` serves it; its URL."""
    pytest.importorskip("gradio")
    from client.webui import build_app, use_as_gradio_cache

    output_dir = webui_output_dir
    cache_before = os.environ.get("GRADIO_TEMP_DIR")
    os.environ.pop("GRADIO_TEMP_DIR", None)
    use_as_gradio_cache(output_dir)
    app = build_app(triton_server.grpc_address, stream.describe(triton_server.grpc_address), output_dir)
    (port,) = free_ports(1)
    app.queue().launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
        allowed_paths=[str(output_dir)],
    )
    yield f"http://127.0.0.1:{port}/"
    app.close()
    os.environ.pop("GRADIO_TEMP_DIR", None)
    if cache_before is not None:
        os.environ["GRADIO_TEMP_DIR"] = cache_before


@pytest.fixture
def page(browser, web_ui):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(web_ui)
    upload(page, page.locator("input[type=file]").first, SAMPLE)
    page.locator("#status").wait_for()
    page.evaluate(RECORDER)
    yield page
    context.close()


def field(page, label: str):
    return page.get_by_label(label, exact=True)


def set_fields(page, values: dict[str, object]) -> None:
    for label, value in values.items():
        field(page, label).fill(str(value))


def upload(page, file_input, path: Path) -> None:
    """Upload `path` through `file_input` and wait until the page shows it: a job started before
    the upload has finished would still use the image the field held before."""
    file_input.set_input_files(path)
    page.locator(f'img[src*="{path.name}"]').first.wait_for()


def wait_for_status(page, prefix: str) -> str:
    # Generous: on a loaded 2-core machine the tiny model's first section can take a while.
    page.wait_for_function(
        "prefix => document.querySelector('#status textarea').value.startsWith(prefix)", arg=prefix,
        timeout=120_000,
    )
    return field(page, "Status").input_value()


@pytest.mark.server
def test_dance_preset_fills_the_settings(page):
    assert field(page, "Steps").input_value() == "25"  # Default
    field(page, "Preset").click()
    page.get_by_role("option", name="Dance").click()
    page.wait_for_function("() => document.querySelector('input[aria-label=\"Flow preset\"]').value === 'dance'")
    dance = PRESETS["Dance"]
    assert (dance.steps, dance.gs, dance.teacache, dance.flow_preset) == (30, 12.0, False, "dance")
    assert int(field(page, "Steps").input_value()) == dance.steps
    assert float(field(page, "Distilled guidance (gs)").input_value()) == dance.gs
    assert field(page, "TeaCache").is_checked() is dance.teacache
    assert field(page, "Flow preset").input_value() == dance.flow_preset
    page.get_by_role("button", name="Advanced").click()  # folded: its fields are made when opened
    assert float(field(page, "GPU memory preservation (GB)").input_value()) == dance.gpu_memory_preservation


@pytest.mark.server
def test_start_is_above_the_fold_and_the_advanced_settings_are_folded(page):
    start = page.get_by_role("button", name="Start").bounding_box()
    assert start["y"] + start["height"] <= page.viewport_size["height"]
    assert field(page, "Steps").is_visible()
    assert not field(page, "Attention backend").is_visible()
    page.get_by_role("button", name="Advanced").click()
    field(page, "Attention backend").wait_for(state="visible")


def paced(run, seconds: float):
    """`run_job` with each update held on the page for `seconds` before the next: the tiny
    model's steps come faster than a loaded machine's browser may render them, and a test of
    what the page shows along the way must not depend on that machine's load."""

    def run_paced(*args, **kwargs):
        for update in run(*args, **kwargs):
            yield update
            time.sleep(seconds)

    return run_paced


@pytest.mark.server
def test_a_job_streams_previews_and_sections_then_offers_the_mp4(page, tmp_path, webui_output_dir, monkeypatch):
    import client.webui

    monkeypatch.setattr(client.webui, "run_job", paced(client.webui.run_job, 0.3))
    field(page, "Prompt").fill("The person dances gracefully, with clear movements, full of charm.")
    set_fields(page, {"Video length (seconds)": 2, "Steps": FAST_SETTINGS["steps"],
                      "Resolution": FAST_SETTINGS["resolution"]})
    page.get_by_role("button", name="Start").click()
    done = wait_for_status(page, "Done")
    assert done.startswith("Done: 73 frames")
    link = page.locator("#download a").first
    link.wait_for()

    seen = page.evaluate("window.seen")
    before_done = seen["status"][: next(i for i, s in enumerate(seen["status"]) if s.startswith("Done"))]
    steps_shown = [s for s in before_done if s.startswith("Section") and " step " in s]
    assert len(steps_shown) >= 2, seen["status"]
    assert re.fullmatch(r"Section 1/2 · step [1-4]/4 · \d+:\d\d elapsed · ETA \d+:\d\d \+ decoding\n"
                        r"Video: 73 frames = 2\.43 s \(2 sections of 9 latent frames\) at 144×112", steps_shown[0])
    assert len(seen["preview"]) >= 2
    # The video grew section by section: the first section's clip played before the whole video.
    assert "partial_01.mp4" in seen["video"][0] and seen["video"][-1].endswith("framepack_seed31337.mp4")

    with page.expect_download() as download:
        link.click()
    mp4 = tmp_path / "download.mp4"
    download.value.save_as(mp4)
    with av.open(str(mp4)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 73  # 2 s → 2 sections of 36 frames + the start frame
    assert np.stack(frames).std() > 5  # the random model paints moving noise, not a blank

    # Each section's partial MP4 was deleted once the next one showed (the last one just
    # after the page showed Done); Gradio copied none.
    for _ in range(50):
        videos = sorted(webui_output_dir.rglob("*.mp4"))
        if all(path.name == "framepack_seed31337.mp4" for path in videos):
            break
        time.sleep(0.1)
    assert videos and all(path.name == "framepack_seed31337.mp4" for path in videos), videos

    page.screenshot(path=tmp_path / "webui.png", full_page=True)
    assert (tmp_path / "webui.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("FRAMEPACK_UPDATE_SCREENSHOT"):  # refresh the README's picture
        shutil.copyfile(tmp_path / "webui.png", SCREENSHOT)


@pytest.mark.server
def test_an_uploaded_phone_photo_is_turned_upright_and_the_status_says_so(page, tmp_path, webui_output_dir):
    stored = np.zeros((96, 192, 3), np.uint8)  # landscape as stored; portrait once turned
    stored[:, :96] = (220, 40, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "IMG_2041.jpg"
    Image.fromarray(stored).save(photo, quality=95, exif=exif.tobytes())
    upload(page, page.locator("input[type=file]").first, photo)  # in place of the sample image
    set_fields(page, {"Video length (seconds)": 1, "Steps": 1, "Resolution": FAST_SETTINGS["resolution"]})
    before = finished_videos(webui_output_dir)
    page.get_by_role("button", name="Start").click()
    done = wait_for_status(page, "Done")
    assert done.splitlines()[1] == (
        "Start image IMG_2041.jpg: turned upright (rotated 90° clockwise) per its EXIF orientation 6."
    )
    [video] = finished_videos(webui_output_dir) - before
    with av.open(str(video)) as container:
        stream_info = container.streams.video[0]
        assert stream_info.height > stream_info.width  # portrait, as the photo is shown


@pytest.mark.server
def test_stop_cancels_the_job_on_the_server(page, triton_server):
    log_lines_before = triton_server.log_path.read_text().count("cancelled by the client")
    set_fields(page, {"Video length (seconds)": 20, "Steps": FAST_SETTINGS["steps"],
                      "Resolution": FAST_SETTINGS["resolution"]})
    page.get_by_role("button", name="Start").click()
    wait_for_status(page, "Section 1/")
    page.get_by_role("button", name="Stop").click()
    assert wait_for_status(page, "Cancelled").startswith("Cancelled: the job was stopped on the server")
    # The Stop button's own answer lands apart from the job's updates and must not overwrite the
    # end: a second after the end the status still says it.
    page.wait_for_timeout(1000)
    assert field(page, "Status").input_value().startswith("Cancelled: the job was stopped on the server")
    deadline = time.monotonic() + 30
    while triton_server.log_path.read_text().count("cancelled by the client") == log_lines_before:
        assert time.monotonic() < deadline, "the server did not log the cancellation"
        time.sleep(0.2)
    assert page.locator("#download a").count() == 0
    assert page.get_by_role("button", name="Start").is_enabled()


@pytest.mark.server
def test_a_rejected_setting_shows_the_server_s_message(page):
    set_fields(page, {"Resolution": 200})  # the page lets it through; the server wants a multiple of 16
    page.get_by_role("button", name="Start").click()
    message = wait_for_status(page, "Error")
    assert message == (
        "Error: INVALID_ARGUMENT: resolution=200 is not allowed: expected a multiple of 16 between 128 and 1280"
    )


def test_ui_takes_the_same_tls_options_and_refuses_inconsistent_ones(tmp_path, capsys):
    from client import cli

    ca = tmp_path / "ca.pem"
    ca.write_text("not checked before connecting")
    assert cli.main(["ui", "--server", "localhost:1", "--root-certificates", str(ca)]) == cli.EXIT_USAGE
    assert "need ssl=True (--ssl)" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["ui", "--ssl", "--root-certificates", str(ca), "--connect-timeout", "5"])
    endpoint = cli.endpoint(args)
    assert (endpoint.ssl, endpoint.root_certificates, endpoint.connect_timeout_s) == (True, ca, 5.0)


UI_WITH_A_DESCRIBED_SERVER = """
import sys
from client import cli, stream
from framepack_server.protocol import describe_response
from framepack_wire import event_from_json
stream.describe = lambda server: event_from_json(describe_response().event)
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_framepack_ui_prints_its_url_once_it_serves_there(tmp_path):
    pytest.importorskip("gradio")
    (port,) = free_ports(1)
    environment = {key: value for key, value in os.environ.items() if key != "GRADIO_TEMP_DIR"}
    ui = subprocess.Popen(
        [sys.executable, "-c", UI_WITH_A_DESCRIBED_SERVER, "ui", "--server", "127.0.0.1", "--port", str(port),
         "--output-dir", str(tmp_path)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**environment, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = ui.stderr.readline()
        assert line.strip() == (
            f"framepack: web UI for 127.0.0.1:8001 at http://127.0.0.1:{port}, videos under {tmp_path}"
        )
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "FramePack" in page
    finally:
        ui.send_signal(signal.SIGINT)
        ui.wait(30)


@pytest.mark.server
def test_a_dropped_record_fills_the_page_and_a_queued_job_is_offered_with_its_record(page, tmp_path):
    from client.provenance import job_record, read_record

    used = {"seed": 77, "steps": 1, "seconds": 0.5, "resolution": 128, "teacache": False}
    final = stream.Final(19, 30, 144, 112, 77, used, {}, parameters={"prompt": "a person jumps", **used})
    record_file = tmp_path / "earlier.json"
    record_file.write_text(json.dumps(job_record(WireRequest(np.zeros((2, 2, 3), np.uint8), "p", {}), None, 20,
                                                 final)))
    page.locator("#load input[type=file]").set_input_files(record_file)
    wait_for_status(page, "Loaded the settings of earlier.json")
    assert field(page, "Prompt").input_value() == "a person jumps"
    assert (field(page, "Seed").input_value(), field(page, "Steps").input_value()) == ("77", "1")
    assert field(page, "MP4 quality (CRF)").input_value() == "20"
    assert field(page, "TeaCache").is_checked() is False

    page.get_by_role("button", name="Add to queue").click()
    wait_for_status(page, "Added job 1 to the queue.")
    page.get_by_role("button", name=re.compile(r"^Queue")).click()  # the folded group, not "Add to queue"
    link = page.locator("#results a").first
    link.wait_for(timeout=120_000)
    with page.expect_download() as download:
        link.click()
    mp4 = tmp_path / "job.mp4"
    download.value.save_as(mp4)
    record = read_record(mp4)
    assert record["final"]["parameters"] == {**record["final"]["parameters"], "prompt": "a person jumps", **used}
    assert record["crf"] == 20 and record["image"]["sha256"]
    with av.open(str(mp4)) as container:
        assert len(list(container.decode(video=0))) == record["final"]["frame_count"] == 37
    assert "done" in page.locator("#queue").inner_text()


def test_a_clip_uploaded_instead_of_an_image_is_extended_and_the_mp4_shows_it_first(browser, web_ui, tmp_path,
                                                                                      webui_output_dir):
    from client.video import write_mp4

    y, x = np.mgrid[0:96, 0:128]
    frames = np.stack([np.stack([(x * 2 + 6 * t) % 256, y * 2, (x + y) % 256], -1) for t in range(9)])
    clip = write_mp4(tmp_path / "walk.mp4", frames.astype(np.uint8), 30, crf=0)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(web_ui)
    page.locator("#clip input[type=file]").set_input_files(clip)
    page.locator("#clip video").wait_for()
    field(page, "Prompt").fill("it goes on")
    set_fields(page, {"Video length (seconds)": 1, "Steps": 1, "Resolution": FAST_SETTINGS["resolution"]})
    before = finished_videos(webui_output_dir)
    page.get_by_role("button", name="Start").click()
    done = wait_for_status(page, "Done")
    assert done.startswith("Done: 36 frames") and "Clip walk.mp4: 1 of its 9 frames sent" in done
    [video] = finished_videos(webui_output_dir) - before
    with av.open(str(video)) as container:
        assert len(list(container.decode(video=0))) == 9 + 36
    context.close()
