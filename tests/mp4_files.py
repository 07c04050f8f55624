"""Reading back the MP4s the tests write: decoded frames, and the encoded packets
(the file's bytes apart from its container metadata, which records the request)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def mp4_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def mp4_packets(path: Path) -> list[bytes]:
    """The encoded video, packet by packet."""
    with av.open(str(path)) as container:
        return [bytes(packet) for packet in container.demux(video=0) if packet.size]
