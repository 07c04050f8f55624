"""Thin streaming client of the `framepack` Triton model: gRPC in, MP4 out.

It imports neither torch nor the engine: settings pass through to the server, which
validates them and answers with what it used.
"""
