"""Serving FramePack with Triton Inference Server: launcher, wire protocol, job queue.

`framepack_server.launcher` starts `tritonserver` against `model_repository/`, whose
Python-backend model (`model_repository/framepack/1/model.py`) uses `protocol` and
`jobs` from here to adapt the engine (`framepack_backend`) to Triton.
"""
