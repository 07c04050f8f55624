"""`framepack ui`: the Gradio web app, a client of a FramePack Triton server.

    framepack ui --server localhost:8001 --host 127.0.0.1 --port 7860

The page holds no model: it asks the server what it accepts (a `describe` request: every
setting's default, choices and help, and the preset table) and builds its fields from
that, so the UI shows the engine's values without importing the engine. Values go to the
server as they are; the server validates them, and a refusal is shown with its message.
The MP4's quality (crf) is the client's own option (client/video.py): it has a field
too, but stays in this process.

The uploaded file reaches the job as it was saved (`type="filepath"`, no mode given, so
Gradio passes the file on untouched) and is read as the CLI reads it (client/images.py:
EXIF orientation, 16-bit, transparency, the server's pixel limit); what was done to it is
shown under the status. `framepack ui` makes the output folder Gradio's cache, so the
page's files (uploads, and the MP4s it shows, which Gradio would otherwise copy into
/tmp/gradio and keep) stay there; a job keeps only its final MP4.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr

from framepack_wire import WireRequest

from . import stream
from .connection import Endpoint, as_endpoint
from .images import ImageLoadError, load_image
from .video import CRF_DEFAULT, CRF_SPEC, parse_crf
from .webui_job import JobUpdate, StopSignals, run_job

# The seed app's example prompts: subject, then motion, then qualifiers.
EXAMPLE_PROMPTS = (
    "The person dances gracefully, with clear movements, full of charm.",
    "The person performs a spinning motion with arms extended.",
    "The person talks animatedly, using hand gestures to emphasize points.",
    "The person waves hello with a friendly smile.",
    "The person makes subtle movements, with a calm expression.",
)

# Where each setting sits on the page. A setting the server describes that is missing
# here still gets a field, under "More"; one the server does not describe gets none,
# except the client's own options (CLIENT_SETTINGS).
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "Video": ("seconds", "seed", "resolution", "crf", "preview"),
    "Sampling": ("steps", "gs", "cfg", "rs", "window", "flow_preset"),
    "Step cache": ("cache", "teacache", "teacache_threshold", "teacache_mode"),
    "MagCache": ("magcache_threshold", "magcache_max_skips", "magcache_retention"),
    "Advanced": ("attention", "memory_mode", "solver", "gpu_memory_preservation", "sampling"),
}
# Groups shown folded: settings most jobs leave at the server's choice.
FOLDED_GROUPS = ("MagCache", "Advanced", "More")
# Options this client applies itself, in the describe answer's shape; never sent.
CLIENT_SETTINGS = {"crf": CRF_SPEC}
FIELDS_PER_ROW = 4
# Fields placed by hand above the groups.
PROMPT_SETTINGS = ("negative_prompt", "preset")

LABELS = {
    "seconds": "Video length (seconds)",
    "seed": "Seed",
    "resolution": "Resolution",
    "crf": "MP4 quality (CRF)",
    "steps": "Steps",
    "gs": "Distilled guidance (gs)",
    "cfg": "Real CFG (cfg)",
    "rs": "CFG rescale (rs)",
    "window": "Latent window size",
    "flow_preset": "Flow preset",
    "sampling": "Sampling",
    "solver": "Solver",
    "teacache": "TeaCache",
    "teacache_threshold": "TeaCache threshold",
    "teacache_mode": "TeaCache mode",
    "cache": "Step cache",
    "magcache_threshold": "MagCache threshold",
    "magcache_max_skips": "MagCache max consecutive skips (K)",
    "magcache_retention": "MagCache retention ratio",
    "attention": "Attention backend",
    "memory_mode": "Memory mode",
    "gpu_memory_preservation": "GPU memory preservation (GB)",
    "preview": "Stream previews",
    "negative_prompt": "Negative prompt",
}


def build_app(server: str | Endpoint, description: stream.Description, output_dir: Path) -> gr.Blocks:
    """The page for one server; jobs write their MP4s into fresh folders under `output_dir`
    (see use_as_gradio_cache)."""
    stops = StopSignals()
    output_dir = Path(output_dir)
    with gr.Blocks(title="FramePack", analytics_enabled=False) as app:
        gr.Markdown(f"## FramePack image to video\nServer: `{as_endpoint(server).address}`")
        with gr.Row():
            with gr.Column():
                # The file as uploaded: converting it here would drop its EXIF orientation,
                # clip 16-bit values and blacken transparent areas (load_image handles them).
                image = gr.Image(label="Start image", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], height=320)
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Subject, motion, qualifiers")
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    stop = gr.Button("Stop", variant="stop", interactive=False)
                gr.Examples([[text] for text in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts")
                preset = gr.Dropdown(
                    list(description.presets), value=_first_preset(description), label="Preset",
                    info="fills the settings below with the preset's values",
                )
                fields = {"negative_prompt": setting_field("negative_prompt", description.settings["negative_prompt"])}
            with gr.Column():
                status = gr.Textbox(label="Status", interactive=False, lines=2, elem_id="status")
                # The preview is the window's latent frames side by side: a wide strip.
                preview = gr.Image(label="Preview", type="numpy", interactive=False, height=120, elem_id="preview")
                video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, height=360,
                                 elem_id="video")
                download = gr.File(label="MP4", interactive=False, elem_id="download")
        for group, group_names in _groups(description).items():
            with gr.Accordion(group, open=group not in FOLDED_GROUPS):
                for row in range(0, len(group_names), FIELDS_PER_ROW):
                    with gr.Row():
                        for name in group_names[row : row + FIELDS_PER_ROW]:
                            fields[name] = setting_field(name, _spec(description, name))

        names = list(fields)
        preset_fields = [name for name in names if any(name in values for values in description.presets.values())]

        def apply_preset(name: str | None) -> dict:
            values = description.presets.get(name or "", {})
            return {fields[field]: values[field] for field in preset_fields if field in values}

        # Gradio passes the request by its annotation; first, because the fields' values follow as *values.
        def start_job(request: gr.Request, image_path: str | None, prompt_value: str,
                      preset_value: str | None, *values):
            if image_path is None:
                yield {status: "Upload a start image first."}
                return
            try:
                loaded = load_image(image_path)
            except ImageLoadError as e:
                yield {status: f"Error: the start image {Path(image_path).name}: {_after_path(e, image_path)}"}
                return
            note = f"Start image {Path(image_path).name}: {'; '.join(loaded.notes)}." if loaded.notes else ""
            settings = {name: value for name, value in zip(names, values) if value is not None}
            if preset_value:
                settings["preset"] = preset_value  # recorded by the server; the fields' values win
            try:
                crf = parse_crf(settings.pop("crf", CRF_DEFAULT))
            except ValueError as e:
                yield {status: f"Error: {e}"}
                return
            job = WireRequest(loaded.pixels, prompt_value, settings)
            flag = stops.start(request.session_hash)
            folder = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            yield {start: gr.update(interactive=False), stop: gr.update(interactive=True),
                   preview: None, video: None, download: None}
            try:
                for update in run_job(server, job, folder, flag.is_set, crf):
                    yield _page_update(update, status, preview, video, download, note)
            finally:
                stops.finish(request.session_hash, flag)
            yield {start: gr.update(interactive=True), stop: gr.update(interactive=False)}

        def stop_job(request: gr.Request) -> dict:
            stops.stop(request.session_hash)
            return {stop: gr.update(interactive=False), status: "Stopping…"}

        preset.change(apply_preset, preset, [fields[name] for name in preset_fields])
        start.click(
            start_job, [image, prompt, preset, *fields.values()], [start, stop, status, preview, video, download],
            show_progress="hidden", concurrency_limit=None,  # the server's job queue decides what runs
        )
        stop.click(stop_job, None, [stop, status], queue=False)
    return app


def setting_field(name: str, spec: dict) -> gr.components.Component:
    """A field for one setting, from the server's spec; no range limits: the server checks."""
    label = LABELS.get(name, name.replace("_", " ").capitalize())
    info = spec["doc"]
    if spec["low"] is not None:
        info += f" ({spec['low']}–{spec['high']})"
    if spec["type"] == "bool":
        return gr.Checkbox(value=spec["default"], label=label, info=info)
    if spec["choices"]:
        return gr.Dropdown(spec["choices"], value=spec["default"], label=label, info=info)
    if spec["type"] in ("int", "float"):
        return gr.Number(value=spec["default"], label=label, info=info, precision=0 if spec["type"] == "int" else None)
    return gr.Textbox(value=spec["default"], label=label, info=info)


def _spec(description: stream.Description, name: str) -> dict:
    return CLIENT_SETTINGS[name] if name in CLIENT_SETTINGS else description.settings[name]


def _groups(description: stream.Description) -> dict[str, list[str]]:
    offered = dict.fromkeys([*description.settings, *CLIENT_SETTINGS])  # an older server also describes crf
    described = [name for name in offered if name not in PROMPT_SETTINGS]
    groups = {group: [name for name in names if name in described] for group, names in SETTING_GROUPS.items()}
    placed = {name for names in groups.values() for name in names}
    groups["More"] = [name for name in described if name not in placed]
    return {group: names for group, names in groups.items() if names}


def _first_preset(description: stream.Description) -> str | None:
    return "Default" if "Default" in description.presets else next(iter(description.presets), None)


def _page_update(update: JobUpdate, status, preview, video, download, note: str = "") -> dict:
    changes = {status: f"{update.status}\n{note}" if note else update.status}
    if update.preview is not None:
        changes[preview] = update.preview
    if update.video is not None:
        changes[video] = str(update.video)
    if update.final is not None:
        changes[download] = str(update.final)
    return changes


def _after_path(error: ImageLoadError, path: str) -> str:
    """The reason of a load error, without the (temporary, long) upload path it starts with."""
    return str(error).removeprefix(f"{path}: ")


def use_as_gradio_cache(folder: Path) -> None:
    """Make `folder` Gradio's cache for this process (its GRADIO_TEMP_DIR), unless the user
    chose one: uploads land there, and the MP4s a job writes under it are served from where
    they are, instead of being copied into /tmp/gradio and kept there."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(folder))


def serve(server: str | Endpoint, host: str, port: int, output_dir: Path | None = None) -> int:
    """Ask the server what it accepts, then serve the page until Ctrl-C."""
    try:
        description = stream.describe(server)
    except stream.ServerError as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return 1
    output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="framepack-ui-"))
    use_as_gradio_cache(output_dir)
    app = build_app(server, description, output_dir)
    try:
        app.queue().launch(server_name=host, server_port=port, allowed_paths=[str(output_dir)], quiet=True,
                           prevent_thread_lock=True)
    except OSError as e:  # the port was taken since it was checked
        print(f"framepack: error: --host {host} --port {port}: cannot serve the web UI ({e})", file=sys.stderr)
        return 1
    print(f"framepack: web UI for {as_endpoint(server).address} at http://{host}:{port}, videos under {output_dir}",
          file=sys.stderr)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
