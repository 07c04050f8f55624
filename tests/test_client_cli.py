"""The CLI's options and messages, without a server: addresses, timeouts, the settings
table, `--help`, and previews and clips that cannot be written where asked."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from client import cli, stream
from client.connection import DEFAULT_GRPC_PORT, Endpoint, with_default_port
from framepack_wire import DescribeMeta


@pytest.mark.parametrize(
    "given, used",
    [
        ("127.0.0.1", "127.0.0.1:8001"),
        ("gpu-box", "gpu-box:8001"),
        ("gpu-box:9001", "gpu-box:9001"),
        ("::1", "[::1]:8001"),
        ("[::1]", "[::1]:8001"),
        ("[::1]:9001", "[::1]:9001"),
        ("unix:/run/triton.sock", "unix:/run/triton.sock"),
        ("dns:///gpu-box:9001", "dns:///gpu-box:9001"),
    ],
)
def test_an_address_without_a_port_gets_triton_s_grpc_port(given, used):
    assert DEFAULT_GRPC_PORT == 8001
    assert with_default_port(given) == used
    assert Endpoint(given).address == used


def test_server_without_a_port_means_8001_for_generate_and_ui():
    for command in (["generate", "--image", "i.png", "--prompt", "p", "--output", "o.mp4"], ["ui"], ["settings"]):
        args = cli.build_parser().parse_args([*command, "--server", "127.0.0.1"])
        assert cli.endpoint(args).address == "127.0.0.1:8001"


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_connect_timeout_must_be_a_positive_number_of_seconds(value, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["ui", "--connect-timeout", value])
    assert exited.value.code == cli.EXIT_USAGE
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("framepack ui: error: argument --connect-timeout: ") and value in last
    with pytest.raises(ValueError, match="connect timeout"):
        Endpoint("h:1", connect_timeout_s=-1.0)


@pytest.mark.parametrize("value", ["0", "65536", "http"])
def test_ui_port_must_be_a_port(value, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["ui", "--port", value])
    assert "argument --port" in capsys.readouterr().err


DESCRIPTION = DescribeMeta(
    settings={
        "steps": {"type": "int", "default": 25, "low": 1, "high": 100, "choices": None, "doc": "sampling steps"},
        "teacache": {"type": "bool", "default": True, "low": None, "high": None, "choices": None, "doc": "reuse"},
        "preset": {"type": "str", "default": "", "low": None, "high": None, "choices": ["", "Default", "Dance"],
                   "doc": "named preset"},
        "attention": {"type": "str", "default": None, "low": None, "high": None, "choices": ["auto", "sdpa"],
                      "doc": "attention backend"},
    },
    presets={"Dance": {"steps": 30, "teacache": False}},
    flow_presets=["standard"],
)


def test_framepack_settings_prints_the_server_s_describe_answer_as_a_table(monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(stream, "describe", lambda server: asked.append(server) or DESCRIPTION)
    assert cli.main(["settings", "--server", "gpu-box"]) == 0
    assert asked == [Endpoint("gpu-box:8001")]
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["option", "default", "allowed", "meaning"]
    rows = {line[0]: line for line in lines[1:] if line and line[0].startswith("--")}
    assert rows["--steps"] == ["--steps", "25", "int", "in", "[1,", "100]", "sampling", "steps"]
    assert rows["--teacache"] == ["--teacache", "on", "on,", "off", "reuse"]
    assert rows["--preset"] == ["--preset", "Default,", "Dance", "named", "preset"]
    assert rows["--attention"][:3] == ["--attention", "auto,", "sdpa"]
    assert rows["--crf"][:5] == ["--crf", "16", "int", "in", "[0,"]  # the client's own option
    assert ["Dance:", "steps=30,", "teacache=off"] in lines


def test_framepack_settings_reports_an_unreachable_server_in_one_line(monkeypatch, capsys):
    def down(server):
        raise stream.ServerError("UNAVAILABLE", "cannot reach the server at gpu-box:8001")

    monkeypatch.setattr(stream, "describe", down)
    assert cli.main(["settings", "--server", "gpu-box"]) == cli.EXIT_SERVER_ERROR
    assert capsys.readouterr().err.splitlines() == [
        "framepack: error: UNAVAILABLE: cannot reach the server at gpu-box:8001"
    ]


def test_generate_help_says_where_the_defaults_and_ranges_are(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "`framepack settings --server HOST[:PORT]` lists each setting's default and allowed values" in help_text
    assert "--blend-latents VALUE" in help_text
    assert "port 8001 when none is given" in help_text


def test_a_preview_that_cannot_be_written_goes_to_a_fallback_file(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    preview = np.zeros((8, 24, 3), np.uint8)
    preview[:, :12] = (10, 200, 30)
    event = stream.Progress(section=1, sections=2, step=3, steps=4, elapsed_s=1.0, preview=preview)
    saved = cli.save_preview(blocker / "previews", event)
    assert saved.path.parent == here and saved.path.name.startswith("preview_s01_003-")
    assert (np.asarray(Image.open(saved.path)) == preview).all()
    err = capsys.readouterr().err
    assert err.startswith(f"framepack: warning: could not write {blocker / 'previews' / 'preview_s01_003.png'} (")
    assert err.strip().endswith(f"the preview was saved to {saved.path} instead")


def test_a_section_clip_that_cannot_be_written_goes_to_a_fallback_file(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.chdir(tmp_path)
    frames = np.full((3, 16, 16, 3), 90, np.uint8)
    event = stream.Section(section=2, sections=2, start_frame=0, total_frames=3, fps=30, frames=frames)
    saved = cli.save_section(blocker / "clips", event, crf=20)
    assert saved.fell_back and saved.path.parent == tmp_path and saved.path.name.startswith("section_02-")
    assert saved.path.stat().st_size > 0
    assert "the video was saved to" in capsys.readouterr().err
