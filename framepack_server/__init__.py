"""Serving FramePack with Triton Inference Server: server process, wire protocol, job queue.

`framepack_server.server` starts `tritonserver` against `model_repository/` (`cli` is its
command line, `framepack-server`), whose Python-backend model
(`model_repository/framepack/1/model.py`) uses `protocol` and `jobs` from here to adapt
the engine (`framepack_backend`) to Triton.
"""
