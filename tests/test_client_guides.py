"""The client's side of the creative controls: --keyframe parsing, keyframes brought to one
size, the wire inputs a request sends (no server)."""

import argparse

import numpy as np
import pytest
from PIL import Image

from client.cli import build_parser, settings_table
from client.guides import cover, keyframe_argument, load_guides, load_keyframes
from framepack_wire import END_IMAGE_INPUT, IMAGE_INPUT, KEYFRAMES_INPUT, WireRequest


def test_keyframe_argument_is_seconds_and_a_path():
    assert keyframe_argument("2.5:middle.png") == (2.5, __import__("pathlib").Path("middle.png"))
    assert keyframe_argument("3s:C:/frames/a.png")[0] == 3.0  # only the first colon separates
    for bad in ("middle.png", "x:middle.png", "-1:a.png", "2:"):
        with pytest.raises(argparse.ArgumentTypeError, match="SECONDS:PATH"):
            keyframe_argument(bad)


def test_the_cli_takes_the_creative_options():
    args = build_parser().parse_args([
        "generate", "--prompt", "[0s: a] [1s: b]", "--output", "o.mp4", "--end-image", "e.png", "--loop",
        "--keyframe", "1:a.png", "--keyframe", "2:b.png", "--end-strength", "0.5", "--latent-init", "noise",
        "--prompt-blend-sections", "2",
    ])
    assert args.image is None and args.loop and [s for s, _ in args.keyframe] == [1.0, 2.0]
    assert (args.setting_end_strength, args.setting_latent_init, args.setting_prompt_blend_sections) == (
        "0.5", "noise", "2")


def test_cover_scales_and_centre_crops_to_the_size():
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, 18:22] = 255  # a white band in the middle: columns 6..14 of the 2x-scaled crop
    out = cover(wide, 20, 20)
    assert out.shape == (20, 20, 3) and out[:, 10].min() > 200 and out[:, 0].max() < 50


def test_keyframes_take_the_start_image_s_size_and_travel_as_one_tensor(tmp_path):
    for name, size in (("a.png", (64, 48)), ("b.png", (30, 90))):
        Image.fromarray(np.full((size[1], size[0], 3), 9, np.uint8)).save(tmp_path / name)
    start = np.zeros((40, 60, 3), np.uint8)
    keyframes = load_keyframes([(1.0, tmp_path / "a.png"), (2.5, tmp_path / "b.png")], start)
    assert [(s, k.shape) for s, k in keyframes] == [(1.0, (40, 60, 3)), (2.5, (40, 60, 3))]
    request = WireRequest(start, "x", {"steps": 1}, end_image=start, keyframes=keyframes)
    arrays = request.input_arrays()
    assert {name: a.shape for name, a in arrays.items()} == {
        IMAGE_INPUT: (40, 60, 3), END_IMAGE_INPUT: (40, 60, 3), KEYFRAMES_INPUT: (2, 40, 60, 3)}
    assert request.request_parameters() == {"prompt": "x", "steps": 1, "keyframe_times": "1,2.5"}
    assert WireRequest(None, "x").input_arrays() == {}  # text-to-video sends no image


def test_the_web_ui_pairs_keyframe_files_with_the_typed_times(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "k.png")
    guides = load_guides(None, [str(tmp_path / "k.png")], " 1.5 ", None)
    assert guides["end_image"] is None and [s for s, _ in guides["keyframes"]] == [1.5]
    with pytest.raises(ValueError, match="one time in seconds per keyframe image"):
        load_guides(None, [str(tmp_path / "k.png")], "", None)
    with pytest.raises(ValueError, match="SECONDS:PATH"):
        load_guides(None, [str(tmp_path / "k.png")], "soon", None)


def test_the_settings_table_names_the_options_this_command_line_takes():
    specs = {name: {"type": kind, "default": default, "low": None, "high": None, "choices": None, "doc": "d"}
             for name, kind, default in (("keyframe_times", "str", ""), ("loop", "bool", False))}
    rows = settings_table(specs, {}).splitlines()
    assert rows[1].startswith("--keyframe SECONDS:PATH") and rows[2].startswith("--loop ")
