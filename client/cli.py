"""`framepack generate`: image + prompt → MP4, through a FramePack Triton server.

    framepack generate --image photo.png --prompt "she waves" --seconds 5 --output wave.mp4
    framepack generate --from wave.mp4 --seed random --output again.mp4   # repeat a job, a new seed
    framepack queue jobs.jsonl --server gpu-a,gpu-b --per-server 2       # many jobs, resumable
    framepack generate --video walk.mp4 --prompt "he turns" --seconds 3 --output longer.mp4
    framepack generate --image a.png --end-image b.png --keyframe 2.4:mid.png --prompt "[0s: sits] [2s: jumps]" ...
    framepack generate --prompt "a cat on a sofa" --latent-init noise --output t2v.mp4   # text-to-video
    framepack settings --server gpu-box                  # the settings' defaults and ranges
    framepack ui --server localhost:8001 --port 7860     # the web UI (the `ui` extra)

Only the settings given on the command line are sent; the server applies its defaults,
validates everything and reports the values it used. A bad value comes back as one line
naming the setting and what is allowed. `--crf` (the MP4's quality) is the client's own
option: it is checked and used here, never sent.

Before a job is sent, the start image is read as the server wants it (client/images.py:
upright, 8-bit RGB, opaque, within the server's pixel limit) and the output paths are
checked (client/outputs.py); a video that cannot be written at the end goes to a
fallback file, and the message says where.

`--video` extends a clip instead (client/source_video.py): only the clip's last frames that
the server's sampling variant reads are sent (`--context-frames` sends fewer), and the MP4
holds the clip, at the output's size and 30 fps, followed by the new frames
(`--extension-only`: the new frames alone).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from tqdm import tqdm

from framepack_wire import LORAS_PARAMETER, MAX_VIDEO_FRAMES, WireRequest

from . import stream
from .connection import DEFAULT_GRPC_PORT, Endpoint
from .guides import keyframe_argument
from .job_files import CLI_NAMES, JobFiles, clip_frames_read, context_frame_count, input_record, load_inputs
from .outputs import SavedFile, VideoWriteError, check_output_paths, write_file_safely, write_video_safely
from .progress import JobClock, plan_text, queued_text
from .provenance import job_inputs, job_record, save_video
from .queue import (
    DEFAULT_RETRIES,
    JobsFileError,
    finished_ok,
    per_server_count,
    read_jobs,
    run_queue,
    server_list,
    summary_table,
)
from .source_video import source_frames
from .video import CRF_DEFAULT, CRF_SPEC, FrameAssembler, parse_crf, write_mp4
from .webui_login import login_problem, read_logins

DEFAULT_SERVER = f"localhost:{DEFAULT_GRPC_PORT}"
SERVER_HELP = f"gRPC address HOST[:PORT] (default %(default)s; port {DEFAULT_GRPC_PORT} when none is given)"
EXIT_SERVER_ERROR = 1  # also: the video could not be written where asked (it is in a fallback file)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
API_KEY_ENV = "FRAMEPACK_API_KEY"  # the server's API key, when --api-key-file is not given

# The engine's settings, by their request-parameter names. Types, defaults, ranges and
# choices live in the engine (framepack_backend/settings.py): the server checks the
# values, and its describe answer (`framepack ui` builds its page from it) lists them.
SETTINGS: dict[str, str] = {
    "seconds": "video length in seconds (30 fps)",
    "seed": "random seed; the same seed gives the same video ('random': drawn here and reported)",
    "steps": "sampling steps per section",
    "gs": "distilled guidance scale",
    "cfg": "real classifier-free guidance scale (1 = off)",
    "rs": "CFG rescale",
    "window": "latent window size (latent frames per section)",
    "blend_latents": "previous-section latent frames re-decoded for the cross-fade (window = the reference's)",
    "teacache": "on/off: reuse transformer results on slowly changing steps",
    "teacache_threshold": "TeaCache accumulated-change threshold",
    "teacache_mode": "default or detail (computes more steps)",
    "cache": "step cache: teacache (on/off by --teacache), magcache or none",
    "magcache_threshold": "MagCache accumulated-error threshold",
    "magcache_max_skips": "MagCache: most consecutive steps skipped (K)",
    "magcache_retention": "MagCache: fraction of the first steps always computed",
    "preset": "named preset applied before the other settings (e.g. Dance, Talking)",
    "flow_preset": "schedule shape: standard, dance, talking, action, subtle, hand_detail",
    "negative_prompt": "negative prompt (used when cfg > 1)",
    "resolution": "bucket base resolution (multiple of 16)",
    "sampling": "inverted (anti-drifting) or f1",
    "solver": "UniPC variant: bh1 or bh2",
    "attention": "attention backend for this job (the choices are in the server's describe answer)",
    "memory_mode": "auto, resident, offload or stream",
    "gpu_memory_preservation": "GB of GPU memory to keep free",
    "preview": "on/off: stream a small preview image every step",
    "end_strength": "0..1: how strongly --end-image conditions the video's end (default 1)",
    "prompt_blend_sections": "sections over which a timed prompt change blends in (0 = at once)",
    "latent_init": "without --image (text-to-video): start from a black, white or noise picture",
}

# Settings this command line spells its own way (client/guides.py: the keyframes carry their times).
CLI_SPELLING = {"keyframe_times": "--keyframe SECONDS:PATH", "loop": "--loop"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framepack", description="FramePack image-to-video client.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="make a video from an image and a prompt")
    start = generate.add_mutually_exclusive_group()
    start.add_argument("--image", type=Path,
                       help="start image (PNG, JPEG, ...); without it (and --video): text-to-video")
    start.add_argument("--video", type=Path, help="a clip to extend (MP4, WebM, ...) instead of a start image")
    generate.add_argument("--context-frames", type=context_frame_count, metavar="K",
                          help="with --video: send at most the clip's last K frames (default: all the server reads, "
                          f"at most {MAX_VIDEO_FRAMES})")
    generate.add_argument("--extension-only", action="store_true",
                          help="with --video: write only the new frames, not the clip before them")
    generate.add_argument("--prompt",
                          help="what should happen in the video; timed: '[0s: a cat sits] [2.5s: the cat jumps]'")
    generate.add_argument("--end-image", type=Path, metavar="PATH", help="the image the video should end on")
    generate.add_argument("--loop", action="store_true", help="end on the start image")
    generate.add_argument("--keyframe", type=keyframe_argument, action="append", default=[], metavar="SECONDS:PATH",
                          help="an image the video should show at SECONDS (repeatable; one per section)")
    generate.add_argument("--output", type=Path, required=True,
                          help="MP4 to write (replaced atomically); its record goes beside it as .json")
    generate.add_argument("--from", dest="source", type=Path, metavar="MP4_OR_JSON",
                          help="repeat the job recorded in an earlier MP4 or its .json (same image, prompt and "
                          "settings); options given here win; the image must be unchanged unless --image is given")
    generate.add_argument("--server", default=DEFAULT_SERVER, help=SERVER_HELP)
    generate.add_argument("--save-previews", type=Path, metavar="DIR", help="save each step's preview as PNG")
    generate.add_argument("--save-sections", type=Path, metavar="DIR", help="save each section as an MP4 clip")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    add_connection_options(generate)
    settings = generate.add_argument_group(
        "settings",
        "omitted settings take the server's defaults; `framepack settings --server HOST[:PORT]` lists each "
        "setting's default and allowed values, as that server checks them",
    )
    for name, text in SETTINGS.items():
        settings.add_argument(f"--{name.replace('_', '-')}", dest=f"setting_{name}", metavar="VALUE", help=text)
    settings.add_argument("--crf", metavar="VALUE",
                          help=f"{CRF_SPEC['doc']}, {CRF_SPEC['low']}..{CRF_SPEC['high']} (default {CRF_DEFAULT}; "
                          "applied by this client)")
    settings.add_argument("--lora", action="append", metavar="NAME[:STRENGTH]", default=[],
                          help="a LoRA of the server's folder, strength -2..2 (default 1); repeat to add several "
                          "(`framepack settings` lists them)")
    described = commands.add_parser("settings", help="list the server's settings: defaults, ranges, choices")
    described.add_argument("--server", default=DEFAULT_SERVER, help=SERVER_HELP)
    add_connection_options(described)
    add_queue_command(commands)
    ui = commands.add_parser("ui", help="serve the web UI (needs the 'ui' extra: gradio)")
    ui.add_argument("--server", default=DEFAULT_SERVER, help=SERVER_HELP)
    ui.add_argument("--host", default="127.0.0.1", help="address the web UI listens on (default %(default)s)")
    ui.add_argument("--port", type=tcp_port, default=7860, help="port of the web UI (default %(default)s)")
    ui.add_argument("--output-dir", type=Path, metavar="DIR", help="where MP4s go (default: a temporary folder)")
    ui.add_argument("--login-file", type=Path, metavar="FILE",
                    help="lines user:password; the page asks for a login (required when --host is not loopback)")
    add_connection_options(ui)
    return parser


def add_queue_command(commands) -> None:
    jobs = commands.add_parser("queue", help="run the jobs of a JSON-lines file over one or several servers")
    jobs.add_argument("jobs", type=Path, metavar="JOBS_FILE",
                      help='one job per line: {"image": ..., "prompt": ..., "settings": {...}, "output": ...}; '
                      "jobs whose output already records them are skipped")
    jobs.add_argument("--server", default=DEFAULT_SERVER, help=SERVER_HELP + "; several separated by commas")
    jobs.add_argument("--per-server", type=per_server_count, default=1, metavar="N",
                      help="jobs in flight on each server (default %(default)s)")
    jobs.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                      help="times a job refused as UNAVAILABLE is sent again (default %(default)s)")
    jobs.add_argument("--quiet", action="store_true", help="no progress bar")
    add_connection_options(jobs)


def run_queue_command(args: argparse.Namespace) -> int:
    """`framepack queue`: the summary table on stdout; 1 when any job failed, 130 after Ctrl-C."""
    try:
        jobs = read_jobs(args.jobs)
        servers = [endpoint(args, address) for address in server_list(args.server)]
    except (JobsFileError, ValueError) as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    outcomes = run_queue(jobs, servers, args.per_server, retries=args.retries, show_progress=not args.quiet)
    print(summary_table(outcomes))
    if any(outcome.status == "cancelled" for outcome in outcomes):
        return EXIT_INTERRUPTED
    return 0 if finished_ok(outcomes) else EXIT_SERVER_ERROR


def add_connection_options(command: argparse.ArgumentParser) -> None:
    connection = command.add_argument_group("connection", "TLS (the server runs with --grpc-server-cert) and patience")
    connection.add_argument("--ssl", action="store_true", help="connect with TLS")
    connection.add_argument("--root-certificates", type=Path, metavar="PEM", help="CA of the server's certificate")
    connection.add_argument("--private-key", type=Path, metavar="PEM", help="client key, if the server asks for one")
    connection.add_argument("--certificate-chain", type=Path, metavar="PEM", help="client certificate chain")
    connection.add_argument("--connect-timeout", type=positive_seconds, default=30.0, metavar="S",
                            help="wait this long for a (re)starting server (default %(default)s)")
    connection.add_argument("--api-key-file", type=Path, metavar="FILE",
                            help=f"the server's API key (server: --api-key-file); default: ${API_KEY_ENV} if set")


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0 (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not allowed: expected a number of seconds > 0")
    return value


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not allowed: expected a port in [1, 65535]")
    return value


def endpoint(args: argparse.Namespace, address: str | None = None) -> Endpoint:
    """The server to talk to, from --server (or `address`) and the connection options
    (ValueError when they conflict)."""
    return Endpoint(
        args.server if address is None else address, ssl=args.ssl, root_certificates=args.root_certificates,
        private_key=args.private_key,
        certificate_chain=args.certificate_chain, connect_timeout_s=args.connect_timeout,
        api_key=api_key(args.api_key_file, os.environ),
    )


def api_key(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """The API key from --api-key-file, else from $FRAMEPACK_API_KEY, else None (ValueError if unreadable)."""
    if path is None:
        return environ.get(API_KEY_ENV, "").strip() or None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it ({e})") from None
    if not key:
        raise ValueError(f"--api-key-file {path}: the file is empty")
    return key


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ui":
        return run_ui(args)
    if args.command == "settings":
        return run_settings(args)
    if args.command == "queue":
        return run_queue_command(args)
    # SIGTERM cancels like Ctrl-C: the job stops on the server and no MP4 is written.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    settings = {name: getattr(args, f"setting_{name}") for name in SETTINGS}
    settings[LORAS_PARAMETER] = ",".join(args.lora) or None  # the server checks names and strengths
    if args.loop:
        settings["loop"] = True
    given_files = JobFiles(args.image, args.video, args.end_image, tuple(args.keyframe), args.context_frames,
                           args.extension_only)
    try:
        args.endpoint = endpoint(args)
        given = {name: value for name, value in settings.items() if value is not None}
        job = job_inputs(args.source, given_files, args.prompt, given,
                         None if args.crf is None else parse_crf(args.crf))
        crf = CRF_DEFAULT if job.crf is None else job.crf
        check_output_paths(args.output, args.save_sections, args.save_previews)
        conflict = job.files.conflict(CLI_NAMES)
        if conflict is not None:
            raise ValueError(conflict)
        loaded = load_inputs(job.files, job.prompt, job.parameters, CLI_NAMES,
                             reads=lambda: clip_frames_read(args.endpoint, job.parameters))
        inputs = input_record(job.files, CLI_NAMES)
    except (ValueError, OSError) as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except stream.ServerError as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    if job.drawn_seed is not None:
        print(f"framepack: seed {job.drawn_seed} (drawn for --seed random)", file=sys.stderr)
    for message in loaded.messages:
        print(f"framepack: {message}", file=sys.stderr)
    request, clip = loaded.request, loaded.clip
    try:
        saved, final = run_generate(args, request, crf, inputs, job.files)
    except stream.ServerError as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except VideoWriteError as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except KeyboardInterrupt:
        print("framepack: cancelled; no video written", file=sys.stderr)
        return EXIT_INTERRUPTED
    frames = f"{final.frame_count} frames"
    if clip is not None and job.files.combined:
        frames = f"{clip.frame_count} frames of the clip then {final.frame_count} new ones"
    print(
        f"framepack: {frames}, {final.width}×{final.height} at {final.fps} fps, "
        f"seed {final.seed}, {final.timings.get('total_s', 0.0):.1f} s on the server",
        file=sys.stderr,
    )
    if saved.fell_back:
        print(f"framepack: error: {saved.message}", file=sys.stderr)
    print(saved.path)
    return EXIT_SERVER_ERROR if saved.fell_back else 0


def run_ui(args: argparse.Namespace) -> int:
    try:
        server = endpoint(args)
    except ValueError as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        problem = login_problem(args.host, args.login_file)
        logins = read_logins(args.login_file) if args.login_file else None
    except ValueError as e:
        problem = str(e)
    if problem is not None:
        print(f"framepack: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    # Before anything slow (importing Gradio, asking the server): a URL is printed only
    # once the page can be served there.
    problem = port_problem(args.host, args.port)
    if problem is not None:
        print(f"framepack: error: --host {args.host} --port {args.port}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from .webui import serve  # gradio is an optional extra
    except ImportError as e:
        print(f"framepack: error: the web UI needs the 'ui' extra (pip install 'framepack-serving[ui]'): {e}",
              file=sys.stderr)
        return EXIT_USAGE
    return serve(server, args.host, args.port, args.output_dir, logins)


def port_problem(host: str, port: int) -> str | None:
    """Why the web UI could not listen on host:port (in use, not an address of this
    machine, not allowed), or None when it can; checked by binding it for a moment."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve the host ({e.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn does, so a port left in TIME_WAIT by a previous run counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "the port is in use; choose another with --port"
            return f"cannot listen there ({e.strerror or e})"
    return None


def run_settings(args: argparse.Namespace) -> int:
    """Print the server's settings (its describe answer) as a table."""
    try:
        description = stream.describe(endpoint(args))
    except ValueError as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except stream.ServerError as e:
        print(f"framepack: error: {e}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    print(settings_table(description.settings, description.presets))
    if description.loras:
        print("\nLoRAs (--lora NAME[:STRENGTH]):")
        for lora in description.loras:
            print(f"  {lora['name']}: rank {lora['rank']}, {lora['format']}, {lora['size_bytes'] / 2**20:.1f} MiB")
    return 0


def settings_table(specs: dict[str, dict], presets: dict[str, dict]) -> str:
    """One row per setting (the option, its default, what is allowed, what it does), then the
    presets; the client's own --crf is listed too."""
    rows = [("option", "default", "allowed", "meaning")]
    for name, spec in {**specs, "crf": CRF_SPEC}.items():
        if spec["choices"]:
            allowed = ", ".join(str(choice) for choice in spec["choices"] if choice != "")
        elif spec["low"] is not None:
            allowed = f"{spec['type']} in [{spec['low']}, {spec['high']}]"
        elif spec["type"] == "bool":
            allowed = "on, off"
        else:
            allowed = spec["type"]
        rows.append((CLI_SPELLING.get(name, f"--{name.replace('_', '-')}"), _shown(spec["default"]), allowed,
                     spec["doc"]))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    if presets:
        lines += ["", "presets (--preset NAME sets these; settings given on the command line win):"]
        for name, values in presets.items():
            lines.append(f"  {name}: " + ", ".join(f"{key}={_shown(value)}" for key, value in values.items()))
    return "\n".join(line.rstrip() for line in lines)


def _shown(value: object) -> str:
    """A value as the command line takes it: on/off for booleans, nothing for none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return "" if value is None else str(value)


def run_generate(
    args: argparse.Namespace, request: WireRequest, crf: int, inputs: Mapping[str, Any] | None = None,
    files: JobFiles = JobFiles(),
) -> tuple[SavedFile, stream.Final]:
    """Stream the job, then save its MP4 with its record (`inputs`: its files, job_files.input_record)."""
    assembler = FrameAssembler()
    final = None
    bar = None
    job_clock = JobClock()
    queued_position = None
    try:
        for event in stream.generate(args.endpoint, request):
            job_clock.update(event)
            if isinstance(event, stream.Queued):
                if event.position != queued_position and not args.quiet:
                    print(f"framepack: {queued_text(event)[:1].lower()}{queued_text(event)[1:]}", file=sys.stderr)
                queued_position = event.position
            elif isinstance(event, stream.Plan):
                if not args.quiet:
                    print(f"framepack: {plan_text(event)}", file=sys.stderr)
            elif isinstance(event, (stream.Phase, stream.Progress)):
                if bar is None:
                    # tqdm's own remaining time knows only steps; the postfix's ETA counts decodes too.
                    bar = tqdm(unit="step", disable=args.quiet, file=sys.stderr,
                               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
                if isinstance(event, stream.Progress):
                    if bar.total is None:
                        bar.total = event.sections * event.steps
                    bar.update(1)
                    if args.save_previews is not None and event.preview is not None:
                        save_preview(args.save_previews, event)
                phase = job_clock.phase_text()
                bar.set_description(phase[:1].lower() + phase[1:], refresh=False)
                eta = job_clock.eta_text()
                bar.set_postfix_str(eta, refresh=False)
                bar.refresh()
            elif isinstance(event, stream.Section):
                assembler.add(event.start_frame, event.frames, event.total_frames)
                if args.save_sections is not None:
                    save_section(args.save_sections, event, crf)
            elif isinstance(event, stream.Final):
                final = event
    finally:
        if bar is not None:
            bar.close()
    if final is None:
        raise stream.ServerError("UNKNOWN", "the server ended the stream without a final response")
    video = assembler.video()
    if len(video) != final.frame_count:
        raise stream.ServerError("UNKNOWN", f"received {len(video)} frames, the server reported {final.frame_count}")

    def before():
        # An extension's MP4 shows the clip, at the video's size, before the new frames (read
        # afresh for each try: a fallback file needs them again).
        if files.video is None or not files.combined:
            return ()
        return source_frames(files.video, final.width, final.height, label="--video")

    record = job_record(request, inputs, crf, final)
    return save_video(args.output, video, final.fps, crf, record, before=before), final


def save_section(folder: Path, event: stream.Section, crf: int) -> SavedFile:
    """The section as an MP4 clip in `folder`; in a fallback file, with a message, when
    that cannot be written (VideoWriteError when nothing could be)."""
    clip = folder / f"section_{event.section:02d}.mp4"
    saved = write_video_safely(clip, event.frames, event.fps, crf, write_mp4)
    _tell(saved)
    return saved


def save_preview(folder: Path, event: stream.Progress) -> SavedFile:
    """The step's preview as a PNG in `folder`, as save_section."""
    path = folder / f"preview_s{event.section:02d}_{event.step:03d}.png"
    saved = write_file_safely(path, partial(_write_png, event.preview), what="preview")
    _tell(saved)
    return saved


def _write_png(pixels, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def _tell(saved: SavedFile) -> None:
    if saved.fell_back:
        tqdm.write(f"framepack: warning: {saved.message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
