# FramePack image-to-video on NVIDIA Triton Inference Server (GPU).
#
#   docker build -t framepack-serving .
#   docker run --gpus all --shm-size 2g -p 127.0.0.1:8001:8001 \
#       -v /path/to/framepack-models:/models:ro framepack-serving
#
# Weights are not in the image: mount a model directory (README, "Real weights") at /models.
# 24.10 is Triton 2.51, the same server as the embedded one the tests run.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# A CUDA build of torch (the PyPI wheel for Linux is one). numpy < 2: the Python backend
# is tested with 1.26; the model's tensors also cross by DLPack, which works with numpy 2.
ARG TORCH_VERSION=2.9.1
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" "numpy<2"
# FlashAttention-4 (CuTe DSL kernels, built on first use): attention "auto" picks it on
# Hopper, the fastest exact attention measured (README, "Speed and memory").
RUN pip install --no-cache-dir "flash-attn-4==4.0.0b36"

WORKDIR /opt/framepack
COPY pyproject.toml README.md ./
COPY framepack_backend ./framepack_backend
COPY kernels ./kernels
COPY framepack_server ./framepack_server
COPY client ./client
COPY model_repository ./model_repository
RUN pip install --no-cache-dir ".[client]" "numpy<2"

# The Python backend's stub starts an isolated interpreter: tell model.py where the
# packages were installed. Weights and the model repository: see config.pbtxt.
ENV FRAMEPACK_PYTHONPATH=/usr/local/lib/python3.10/dist-packages \
    FRAMEPACK_MODEL_DIR=/models \
    FRAMEPACK_MODEL_REPOSITORY=/opt/framepack/model_repository

EXPOSE 8000 8001 8002
# One model instance per visible GPU (KIND_AUTO in config.pbtxt).
CMD ["tritonserver", "--model-repository=/opt/framepack/model_repository", "--exit-timeout-secs=10"]
