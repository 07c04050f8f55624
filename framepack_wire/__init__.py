"""The wire contract of the `framepack` Triton model, imported by the server and the client.

Torch-free and engine-free (numpy and the standard library only), so the thin client can
import it. It names the model, its tensors and request parameters and the start image's limits (`contract.py`), the
status words that start an error message (`contract.py`), the JSON metadata of each
streamed event (`events.py`) and the client's request value (`request.py`). The
protocol itself is described in framepack_server/protocol.py.
"""

from .contract import (
    API_KEY_HEADER,
    DESCRIBE_PARAMETER,
    END_IMAGE_INPUT,
    EVENT_OUTPUT,
    FRAMES_OUTPUT,
    GRPC_API_KEY_HEADER,
    IMAGE_INPUT,
    KEYFRAMES_INPUT,
    LORAS_PARAMETER,
    MAX_IMAGE_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_KEYFRAMES,
    MAX_VIDEO_FRAME_PIXELS,
    MAX_VIDEO_FRAMES,
    MIN_IMAGE_SIDE,
    MODEL_NAME,
    PREVIEW_OUTPUT,
    PROMPT_PARAMETER,
    VIDEO_INPUT,
    Status,
    error_message,
    parse_error_message,
)
from .events import (
    DescribeMeta,
    EventKind,
    EventMeta,
    FinalMeta,
    PhaseMeta,
    PlanMeta,
    ProgressMeta,
    QueuedMeta,
    SectionMeta,
    UnknownEventKind,
    event_from_json,
)
from .request import KEYFRAME_TIMES_PARAMETER, WireRequest

__all__ = [
    "API_KEY_HEADER", "DESCRIBE_PARAMETER", "EVENT_OUTPUT", "FRAMES_OUTPUT", "GRPC_API_KEY_HEADER", "IMAGE_INPUT",
    "LORAS_PARAMETER", "MAX_IMAGE_ASPECT", "MAX_IMAGE_PIXELS", "MIN_IMAGE_SIDE", "MODEL_NAME", "PREVIEW_OUTPUT",
    "MAX_VIDEO_FRAMES", "MAX_VIDEO_FRAME_PIXELS", "VIDEO_INPUT", "END_IMAGE_INPUT", "KEYFRAMES_INPUT", "MAX_KEYFRAMES",
    "PROMPT_PARAMETER", "Status", "error_message", "parse_error_message",
    "DescribeMeta", "EventKind", "EventMeta", "FinalMeta", "PhaseMeta", "PlanMeta", "ProgressMeta", "QueuedMeta",
    "SectionMeta", "UnknownEventKind", "event_from_json",
    "WireRequest", "KEYFRAME_TIMES_PARAMETER",
]
