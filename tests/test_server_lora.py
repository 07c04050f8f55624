"""LoRA per request through the real server and CLI (tiny model, CPU, smallest jobs): the
LoRA changes the video, strength 0 and the job after it are byte-identical to the job
before, bad names and a malformed file are INVALID_ARGUMENT and the server keeps serving."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST_SETTINGS
from mp4_files import mp4_packets
from safetensors.torch import save_file
from test_webui import TIMEOUT_MS, browser, field, set_fields, wait_for_status  # noqa: F401 - browser: a fixture

from client import stream
from client.images import load_image
from framepack_backend.testing.lora_files import diffusers_factors, hunyuan_factors, save_diffusers
from framepack_server.demo import SAMPLE_IMAGE as SAMPLE
from framepack_server.instance import InstanceOverrides
from framepack_server.server import TritonServer, free_ports
from framepack_wire import WireRequest

pytestmark = pytest.mark.server

DIM = 32  # the tiny bundle's transformer: 2 heads × 16


@pytest.fixture(scope="module")
def lora_server(tiny_bundle, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    factors = hunyuan_factors(DIM, 4 * DIM, 2, 2, rank=4, std=0.5)
    save_diffusers(folder / "style.safetensors", diffusers_factors(factors, DIM))
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, DIM),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(DIM + 3, 4)},
              str(folder / "broken.safetensors"))
    grpc, http, metrics = free_ports(3)
    server = TritonServer(tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
                          log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log", startup_timeout_s=300,
                          overrides=InstanceOverrides(lora_dir=str(folder)))
    with server:
        yield server


def cli_mp4(server, output: Path, *loras: str) -> list[bytes]:
    """The encoded video of a CLI job (its metadata records the request, so it differs by the loras asked for)."""
    command = [sys.executable, "-m", "client.cli", "generate", "--image", str(SAMPLE), "--prompt", "a person waves",
               "--output", str(output), "--server", server.grpc_address, "--seconds", "1",
               "--resolution", str(FAST_SETTINGS["resolution"]), "--steps", str(FAST_SETTINGS["steps"])]
    for lora in loras:
        command += ["--lora", lora]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return mp4_packets(output)


def refusal(server, loras: str) -> stream.ServerError:
    request = WireRequest(load_image(SAMPLE).pixels, "x", {**FAST_SETTINGS, "seconds": 1, "loras": loras})
    with pytest.raises(stream.ServerError) as caught:
        list(stream.generate(server.grpc_address, request))
    return caught.value


def test_describe_lists_the_folder(lora_server):
    listing = {entry["name"]: entry for entry in stream.describe(lora_server.grpc_address).loras}
    assert sorted(listing) == ["broken", "style"]
    assert (listing["style"]["rank"], listing["style"]["format"]) == (4, "diffusers")


def test_lora_jobs_end_to_end(lora_server, tmp_path):
    before = cli_mp4(lora_server, tmp_path / "before.mp4")

    for loras, words in [("../style", "not a path"), ("/tmp/style", "not a path"), ("nope", "in the server's folder"),
                         ("style:5", "strength"), ("broken", "broken.safetensors: key")]:
        error = refusal(lora_server, loras)
        assert error.status == "INVALID_ARGUMENT" and error.message.startswith("loras="), (loras, error)
        assert words in error.message, (loras, error.message)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in refusal(lora_server, "broken").message

    with_lora = cli_mp4(lora_server, tmp_path / "lora.mp4", "style:1.5")
    assert with_lora != before
    assert cli_mp4(lora_server, tmp_path / "zero.mp4", "style:0") == before
    assert cli_mp4(lora_server, tmp_path / "after.mp4") == before  # served on, base model untouched


def test_the_web_ui_runs_a_job_with_the_strength_its_slider_sets(lora_server, browser, tmp_path):  # noqa: F811
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from client.provenance import read_record
    from client.webui import build_app

    app = build_app(lora_server.grpc_address, stream.describe(lora_server.grpc_address), tmp_path)
    (port,) = free_ports(1)
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                       allowed_paths=[str(tmp_path)])
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"http://127.0.0.1:{port}/")
        page.locator("input[type=file]").first.set_input_files(SAMPLE)
        field(page, "Prompt").fill("a person waves")
        set_fields(page, {"Video length (seconds)": 1, "Steps": FAST_SETTINGS["steps"],
                          "Resolution": FAST_SETTINGS["resolution"]})
        page.get_by_role("button", name="LoRAs").click()  # the folded group
        # The slider takes the typed number on Enter; Start sends what the slider holds. On a
        # loaded machine an Enter can come before the page listens, so type again until it takes.
        number = page.locator("#lora-style input[type=number]")
        for _ in range(10):
            number.fill("1.5")
            number.press("Enter")
            try:
                page.wait_for_function(
                    "() => document.querySelector('#lora-style input[type=range]').value === '1.5'", timeout=5000)
                break
            except PlaywrightTimeout:
                continue
        else:
            raise AssertionError("the LoRA slider never took the typed strength 1.5")
        page.get_by_role("button", name="Start").click()
        assert wait_for_status(page, "Done").startswith("Done")
    finally:
        context.close()
        app.close()
    [video] = tmp_path.rglob("*.mp4")
    record = read_record(video)
    assert record["sent"]["parameters"]["loras"] == "style:1.5"
    assert record["final"]["settings"]["loras"] == "style:1.5"  # what the job ran with
