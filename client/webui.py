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
shown under the status. A clip uploaded instead of an image is extended: its last frames
go to the server as the CLI sends them (client/source_video.py), and the finished MP4 shows
the clip before the new frames. `framepack ui` makes the output folder Gradio's cache, so the
page's files (uploads, and the MP4s it shows, which Gradio would otherwise copy into
/tmp/gradio and keep) stay there; a job keeps only its final MP4.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr

from framepack_wire import LORAS_PARAMETER, MAX_VIDEO_FRAMES, WireRequest

from . import stream
from .connection import Endpoint, as_endpoint
from .guides import load_guides, timed_keyframes
from .images import ImageLoadError, load_image
from .job_files import JobFiles, input_record
from .provenance import RecordError, read_record, recorded_inputs, repeat_request
from .source_video import VideoLoadError, context_frames, read_clip_end
from .video import CRF_DEFAULT, CRF_SPEC, parse_crf
from .webui_job import JobUpdate, StopSignals, run_job
from .webui_queue import COLUMNS, PageQueue, page_job_files

# The seed app's example prompts: subject, then motion, then qualifiers.
EXAMPLE_PROMPTS = (
    "The person dances gracefully, with clear movements, full of charm.",
    "The person performs a spinning motion with arms extended.",
    "The person talks animatedly, using hand gestures to emphasize points.",
    "The person waves hello with a friendly smile.",
    "The person makes subtle movements, with a calm expression.",
)

CREATIVE_GROUP = "End frame, keyframes, text to video"
TIMED_PROMPT_HELP = "Subject, motion, qualifiers; or timed: [0s: a cat sits] [2.5s: the cat jumps]"

# Where each setting sits on the page. A setting the server describes that is missing
# here still gets a field, under "More"; one the server does not describe gets none,
# except the client's own options (CLIENT_SETTINGS).
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "Video": ("seconds", "seed", "resolution", "crf", "preview"),
    "Sampling": ("steps", "gs", "cfg", "rs", "window", "flow_preset"),
    "Step cache": ("cache", "teacache", "teacache_threshold", "teacache_mode"),
    "MagCache": ("magcache_threshold", "magcache_max_skips", "magcache_retention"),
    "Advanced": ("attention", "memory_mode", "solver", "gpu_memory_preservation", "sampling"),
    # docs/creative-controls.md; the group also holds the end-image and keyframe uploads.
    CREATIVE_GROUP: ("end_strength", "loop", "keyframe_times", "prompt_blend_sections", "latent_init"),
}
# Groups shown folded: settings most jobs leave at the server's choice.
FOLDED_GROUPS = ("MagCache", "Advanced", "More", CREATIVE_GROUP)
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
    "end_strength": "End image strength",
    "loop": "Loop (end on the start image)",
    "keyframe_times": "Keyframe times (seconds, comma-separated)",
    "prompt_blend_sections": "Prompt blend sections",
    "latent_init": "Text-to-video start",
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
                clip = gr.Video(label="Or a clip to extend", sources=["upload"], height=160, elem_id="clip")
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder=TIMED_PROMPT_HELP)
                with gr.Row():
                    start = gr.Button("Start", variant="primary")
                    stop = gr.Button("Stop", variant="stop", interactive=False)
                    enqueue = gr.Button("Add to queue", elem_id="enqueue")
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
                used = gr.JSON(label="Used settings", elem_id="used")
                load = gr.File(label="Load settings from an MP4 or JSON", file_types=[".mp4", ".json"],
                               type="filepath", elem_id="load")
        for group, group_names in _groups(description).items():
            with gr.Accordion(group, open=group not in FOLDED_GROUPS):
                if group == CREATIVE_GROUP:
                    with gr.Row():
                        text_to_video = gr.Checkbox(label="Text to video (no start image)", value=False)
                        end_image = gr.Image(label="End image", type="filepath", image_mode=None,
                                             sources=["upload", "clipboard"], height=160, elem_id="end-image")
                        keyframe_files = gr.File(label="Keyframe images (in the order of their times)",
                                                 file_count="multiple", file_types=["image"], elem_id="keyframes")
                for row in range(0, len(group_names), FIELDS_PER_ROW):
                    with gr.Row():
                        for name in group_names[row : row + FIELDS_PER_ROW]:
                            fields[name] = setting_field(name, _spec(description, name))

        # One strength slider per LoRA of the server's folder (0: not used).
        loras = {}
        if description.loras:
            with gr.Accordion("LoRAs", open=False):
                for lora in description.loras:
                    loras[lora["name"]] = gr.Slider(-2, 2, value=0, step=0.05, label=lora["name"],
                                                    info=f"rank {lora['rank']}, {lora['format']}",
                                                    elem_id=f"lora-{lora['name']}")

        with gr.Accordion("Queue", open=False):
            jobs_table = gr.Dataframe(headers=COLUMNS, interactive=False, elem_id="queue")
            with gr.Row():
                cancel_number = gr.Number(label="Job", precision=0, minimum=1)
                cancel = gr.Button("Cancel job")
            results = gr.File(label="Results", file_count="multiple", interactive=False, elem_id="results")
        page_queue = PageQueue(server, output_dir)

        names = list(fields)
        preset_fields = [name for name in names if any(name in values for values in description.presets.values())]

        def apply_preset(name: str | None) -> dict:
            values = description.presets.get(name or "", {})
            return {fields[field]: values[field] for field in preset_fields if field in values}

        # Gradio passes the request by its annotation; first, because the fields' values follow as *values.
        def start_job(request: gr.Request, image_path: str | None, clip_path: str | None, prompt_value: str,
                      preset_value: str | None, t2v: bool, end_path: str | None, keyframe_paths: list | None,
                      *values):
            try:
                files, settings, crf, keyframe_times = page_job(names, list(loras), image_path, clip_path,
                                                                preset_value, t2v, end_path, keyframe_paths, values)
            except ValueError as e:
                yield {status: str(e)}
                return
            # Not `video`: that name is the page's video component, which this function updates.
            pixels, clip_frames, note = None, None, ""
            if clip_path is not None:
                try:
                    sampling = dict(zip(names, values)).get("sampling")
                    loaded_clip = read_clip_end(clip_path, MAX_VIDEO_FRAMES)
                    loaded_clip = loaded_clip.last(min(context_frames(description.video, sampling),
                                                       len(loaded_clip.frames)))
                except VideoLoadError as e:
                    yield {status: f"Error: the clip {Path(clip_path).name}: {_after_path(e, clip_path)}"}
                    return
                clip_frames = loaded_clip.frames
                note = f"Clip {Path(clip_path).name}: {loaded_clip.message.removeprefix(f'{clip_path}: ')}."
            elif not t2v:
                assert image_path is not None  # checked above
                try:
                    loaded = load_image(image_path)
                except ImageLoadError as e:
                    yield {status: f"Error: the start image {Path(image_path).name}: {_after_path(e, image_path)}"}
                    return
                pixels = loaded.pixels
                note = f"Start image {Path(image_path).name}: {'; '.join(loaded.notes)}." if loaded.notes else ""
            try:
                guides = load_guides(end_path, keyframe_paths, keyframe_times, pixels)
            except ImageLoadError as e:
                yield {status: f"Error: the image {_after_path(e, str(end_path))}"}
                return
            except ValueError as e:
                yield {status: f"Error: {e}"}
                return
            job = WireRequest(pixels, prompt_value, settings, video=clip_frames, **guides)
            try:  # the files the job is made from, for its record (client/job_files.py)
                inputs = input_record(files)
            except ValueError as e:
                yield {status: f"Error: {e}"}
                return
            flag = stops.start(request.session_hash)
            folder = output_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            yield {start: gr.update(interactive=False), stop: gr.update(interactive=True, value="Stop"),
                   preview: None, video: None, download: None}
            try:
                source = Path(clip_path) if clip_path is not None else None
                for update in run_job(server, job, folder, flag.is_set, crf, inputs, source=source):
                    changes = _page_update(update, status, preview, video, download, note)
                    if update.record is not None:
                        changes[used] = shown_record(update.record)
                    yield changes
            finally:
                stops.finish(request.session_hash, flag)
            yield {start: gr.update(interactive=True), stop: gr.update(interactive=False, value="Stop")}

        def stop_job(request: gr.Request) -> dict:
            stops.stop(request.session_hash)
            # The button says it, not the status: this answer and the job's last status update
            # travel apart, and the job may end (status "Cancelled: …") before this one lands.
            return {stop: gr.update(interactive=False, value="Stopping…")}

        # The job the Generate button would start, with the same inputs (start_job's order); its
        # files are read when it runs, so a changed upload field does not change a queued job.
        def add_job(image_path: str | None, clip_path: str | None, prompt_value: str, preset_value: str | None,
                    t2v: bool, end_path: str | None, keyframe_paths: list | None, *values) -> dict:
            try:
                files, settings, crf, _ = page_job(names, list(loras), image_path, clip_path, preset_value, t2v,
                                                   end_path, keyframe_paths, values)
            except ValueError as e:
                return {status: str(e)}
            number = page_queue.add(files, prompt_value, settings, crf)
            return {status: f"Added job {number} to the queue.", jobs_table: page_queue.rows()}

        def cancel_job(number: float | None) -> dict:
            return {status: page_queue.cancel(int(number or 0)), jobs_table: page_queue.rows()}

        def load_settings(path: str | None) -> dict:
            if path is None:
                return {}
            try:
                record = read_record(path)
            except RecordError as e:
                return {status: f"Error: {_after_path(e, path)}"}
            prompt_value, values = repeat_request(record)
            values["crf"] = record["crf"]
            changes = {fields[name]: value for name, value in values.items() if name in fields}
            files = recorded_inputs(record)
            told = f"; add the files it was made from: {', '.join(files)}." if files else " (text to video)."
            return {prompt: prompt_value, used: shown_record(record), **changes,
                    status: f"Loaded the settings of {Path(path).name}{told}"}

        preset.change(apply_preset, preset, [fields[name] for name in preset_fields])
        job_inputs = [image, clip, prompt, preset, text_to_video, end_image, keyframe_files, *fields.values(),
                      *loras.values()]
        enqueue.click(add_job, job_inputs, [status, jobs_table], queue=False)
        cancel.click(cancel_job, cancel_number, [status, jobs_table], queue=False)
        load.upload(load_settings, load, [prompt, used, status, *fields.values()], queue=False)
        gr.Timer(1.0).tick(lambda: (page_queue.rows(), page_queue.results()), None, [jobs_table, results],
                           queue=False, show_progress="hidden")
        start.click(
            start_job, job_inputs, [start, stop, status, preview, video, download, used],
            show_progress="hidden", concurrency_limit=None,  # the server's job queue decides what runs
        )
        stop.click(stop_job, None, [stop], queue=False)
    return app


def lora_parameter(strengths: dict[str, float]) -> str:
    """The `loras` request parameter for the sliders' strengths: those not at 0, as NAME:STRENGTH."""
    return ",".join(f"{name}:{float(strength):g}" for name, strength in strengths.items() if strength)


def page_job(names: list[str], lora_names: list[str], image: str | None, clip: str | None, preset: str | None,
             text_to_video: bool, end_image: str | None, keyframe_paths: list | None,
             values) -> tuple[JobFiles, dict, int, str]:
    """The job the page's fields describe, for Generate and Add to queue alike: its files, its
    settings (the LoRA sliders' strengths included), its crf and the keyframe times as typed.
    ValueError: the status line to show, the uploads checked first. `values`: the fields'
    values in `names` order, then the sliders' in `lora_names` order."""
    files = page_job_files(image, clip, text_to_video, end_image)
    try:
        settings, crf = page_settings(names, preset, values)
        keyframe_times = settings.pop("keyframe_times", "")
        keyframes = timed_keyframes(keyframe_paths, keyframe_times)
    except ValueError as e:
        raise ValueError(f"Error: {e}") from None
    chosen = lora_parameter(dict(zip(lora_names, values[len(names):])))
    if chosen:
        settings[LORAS_PARAMETER] = chosen
    return dataclasses.replace(files, keyframes=tuple(keyframes)), settings, crf, keyframe_times


def page_settings(names: list[str], preset: str | None, values) -> tuple[dict, int]:
    """The page's settings for a job (the fields given a value, the preset named) and its crf;
    ValueError for a bad crf."""
    settings = {name: value for name, value in zip(names, values) if value is not None}
    if preset:
        settings["preset"] = preset  # recorded by the server; the fields' values win
    return settings, parse_crf(settings.pop("crf", CRF_DEFAULT))


def shown_record(record: dict) -> dict:
    """What the page shows of a video's record: the settings used, the model, the versions."""
    final = record["final"]
    return {"seed": final.get("seed"), "parameters": final.get("parameters") or final.get("settings"),
            "crf": record.get("crf"), "model": (final.get("model") or {}).get("sha256"),
            "versions": final.get("versions"), "image": record.get("image"),
            **{name: record[name] for name in ("video", "end_image", "keyframes") if record.get(name)}}


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


def _after_path(error: ValueError, path: str) -> str:
    """The reason of a load error, without the (temporary, long) upload path it starts with."""
    return str(error).removeprefix(f"{path}: ")


def use_as_gradio_cache(folder: Path) -> None:
    """Make `folder` Gradio's cache for this process (its GRADIO_TEMP_DIR), unless the user
    chose one: uploads land there, and the MP4s a job writes under it are served from where
    they are, instead of being copied into /tmp/gradio and kept there."""
    os.environ.setdefault("GRADIO_TEMP_DIR", str(folder))


def serve(server: str | Endpoint, host: str, port: int, output_dir: Path | None = None,
          logins: list[tuple[str, str]] | None = None) -> int:
    """Ask the server what it accepts, then serve the page until Ctrl-C; behind a login
    when `logins` are given (webui_login.py)."""
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
                           prevent_thread_lock=True, auth=logins)
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
