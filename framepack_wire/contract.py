"""Names both sides must agree on: the model, its tensors, its request parameters, the start
image's limits, status words."""

from __future__ import annotations

from enum import Enum

MODEL_NAME = "framepack"
IMAGE_INPUT = "image"  # UINT8 H×W×3
VIDEO_INPUT = "video"  # UINT8 T×H×W×3: the last frames of a clip to extend (instead of `image`)
END_IMAGE_INPUT = "end_image"  # UINT8 H×W×3, optional: the video's last frame
KEYFRAMES_INPUT = "keyframes"  # UINT8 K×H×W×3, optional: at the seconds of the `keyframe_times` parameter
EVENT_OUTPUT = "event"  # UINT8 vector: the event's JSON metadata, UTF-8
FRAMES_OUTPUT = "frames"  # UINT8 T×H×W×3, with `section` events
PREVIEW_OUTPUT = "preview"  # UINT8 h×w×3, with `progress` events when the engine made one
PROMPT_PARAMETER = "prompt"
DESCRIBE_PARAMETER = "describe"
# LoRAs of the server's folder for one job: "NAME[:STRENGTH],..." (names only, never paths;
# the describe answer lists them).
LORAS_PARAMETER = "loras"
# The header that carries the API key of a server started with `--api-key-file`
# (framepack_server/access.py) on HTTP; on gRPC Triton expects it with its own prefix.
API_KEY_HEADER = "x-api-key"
GRPC_API_KEY_HEADER = f"triton-grpc-protocol-{API_KEY_HEADER}"

# The start image the server accepts (checked in framepack_backend/request.py); the client
# downscales a larger photo to MAX_IMAGE_PIXELS before sending it (client/images.py).
MAX_IMAGE_PIXELS = 4096 * 4096
MIN_IMAGE_SIDE = 16
# The image is scaled to cover its bucket (aspect ratios up to about 2.4), so a thin
# strip is upscaled along its long side too: 16×1048576 pixels would become a
# 136-gigapixel array at resolution 1280. A bounded ratio bounds that allocation.
MAX_IMAGE_ASPECT = 16
# Keyframe images per request; each within the start image's limits.
MAX_KEYFRAMES = 16

# The source clip of a video extension (checked in framepack_backend/request.py; sides and
# aspect as the image's). The engine reads at most 19 latent frames of context, which the
# VAE makes of 1 + 4·18 = 73 video frames, so no job needs more (a test ties this to the
# planner). A frame is at most Full HD: the engine scales it to the bucket anyway, and 73
# such frames are already 454 MB in one message; the client downscales larger frames.
MAX_VIDEO_FRAMES = 73
MAX_VIDEO_FRAME_PIXELS = 1920 * 1080


class Status(str, Enum):
    """gRPC status names used as the first word of an error message.

    The stream carries an error's message but not its status code, so the server
    writes `STATUS: text` and the client reads the word back.
    """

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the job ran past the server's time limit
    INTERNAL = "INTERNAL"

    def __str__(self) -> str:
        return self.value


def error_message(status: Status, text: str) -> str:
    """`STATUS: text`, the message of every error our model sends."""
    return f"{Status(status).value}: {text}"


def parse_error_message(message: str) -> tuple[Status, str] | None:
    """(status, text) of a message written by `error_message`; None for any other message
    (Triton's own refusals and transport errors carry no status word)."""
    word, separator, text = message.partition(": ")
    if not separator:
        return None
    try:
        return Status(word), text
    except ValueError:
        return None
