# FramePack image-to-video on NVIDIA Triton Inference Server (GPU).
#
#   docker build -t framepack-serving .
#   docker run --gpus all --shm-size 2g -p 127.0.0.1:8001:8001 \
#       -v /path/to/framepack-models:/models:ro framepack-serving
#
# Weights are not in the image: mount a model directory (README, "Real weights") at /models.
# deploy/compose.yaml runs it on one host with all its GPUs (and an API key), deploy/kubernetes/
# on a cluster. 24.10 is Triton 2.51, the same server as the embedded one the tests run.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

WORKDIR /opt/framepack
# Installed as the README says: torch from the project's one pin, then the project. numpy < 2:
# the Python backend is tested with 1.26 (the model's tensors also cross by DLPack, which
# works with numpy 2). The server extra is left out: the image has its own tritonserver.
# FlashAttention-4 (CuTe DSL kernels, built on first use): attention "auto" picks it on
# Hopper, the fastest exact attention measured (README, "Speed and memory"). The cuDNN
# frontend makes the opt-in FP8 attention (`--attention cudnn-fp8`) available by name.
COPY requirements-torch.txt ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -r requirements-torch.txt "numpy<2" \
    && pip install --no-cache-dir -r requirements-torch.txt "flash-attn-4==4.0.0b36" "nvidia-cudnn-frontend==1.16.0"

COPY pyproject.toml README.md ./
COPY framepack_backend ./framepack_backend
COPY framepack_kernels ./framepack_kernels
COPY framepack_wire ./framepack_wire
COPY framepack_server ./framepack_server
COPY client ./client
COPY model_repository ./model_repository
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -r requirements-torch.txt ".[client]" "numpy<2"

# framepack-server starts the image's tritonserver, restarts it if the model's process
# dies and stops running jobs on SIGTERM. Its log and cache go to a writable folder.
ENV FRAMEPACK_MODEL_REPOSITORY=/opt/framepack/model_repository \
    FRAMEPACK_CACHE=/tmp/framepack
# uid 1000: the image's triton-server user.
USER 1000
EXPOSE 8000 8001 8002
# One GPU group per visible GPU, all taking jobs from one queue (config.pbtxt `groups`).
# Add e.g. `--api-key-file /run/secrets/framepack_api_key` as the container's command.
ENTRYPOINT ["framepack-server", "--tritonserver", "/opt/tritonserver/bin/tritonserver", \
            "--host", "0.0.0.0", "--model-dir", "/models", "--startup-timeout", "3600"]
