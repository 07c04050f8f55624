"""`framepack-server --fused-qkv / --cuda-graphs / --fast-vae-decode`: launcher flag → environment →
model config → EngineOptions, and the refusals where an option cannot apply."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import FAST_SETTINGS
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from client import stream
from client.images import load_image
from framepack_backend.settings import EngineOptions
from framepack_server import cli
from framepack_server import server as server_module
from framepack_server.demo import SAMPLE_IMAGE
from framepack_server.instance import ENV_OVERRIDES, InstanceConfig, InstanceConfigError, InstanceOverrides
from framepack_server.server import ServerStartError, TritonServer, free_ports
from framepack_server.triton_install import default_model_repository
from framepack_wire import WireRequest


class LauncherStopped(Exception):
    pass


def launcher_overrides(monkeypatch, *flags: str) -> InstanceOverrides:
    """The InstanceOverrides `framepack-server FLAGS` hands its server (which is never started)."""
    seen = {}

    class RecordingServer:
        def __init__(self, *args, overrides, **kwargs):
            seen["overrides"] = overrides
            raise LauncherStopped

    monkeypatch.setattr(cli, "TritonServer", RecordingServer)
    with pytest.raises(LauncherStopped):
        cli.main(list(flags))
    return seen["overrides"]


def instance_config(environment: dict[str, str], tmp_path) -> InstanceConfig:
    """What the model instance reads: the repository's own config.pbtxt parameters and the server's environment."""
    config = text_format.Parse((default_model_repository() / "framepack" / "config.pbtxt").read_text(),
                               model_config_pb2.ModelConfig())
    parameters = {key: {"string_value": value.string_value} for key, value in config.parameters.items()}
    args = {"model_config": json.dumps({"parameters": parameters}), "model_instance_kind": "CPU"}
    return InstanceConfig.from_triton(args, {**environment, ENV_OVERRIDES["model_dir"]: str(tmp_path)})


def test_the_flags_reach_the_engine_options(monkeypatch, tmp_path):
    overrides = launcher_overrides(monkeypatch, "--fused-qkv", "--cuda-graphs", "--fast-vae-decode")
    assert (overrides.fused_qkv, overrides.cuda_graphs, overrides.fast_vae_decode) == (True, True, True)
    environment = overrides.environment()
    assert environment == {"FRAMEPACK_FUSED_QKV": "true", "FRAMEPACK_CUDA_GRAPHS": "true",
                           "FRAMEPACK_FAST_VAE_DECODE": "true"}
    config = instance_config(environment, tmp_path)
    assert (config.fused_qkv, config.cuda_graphs, config.fast_vae_decode) == (True, True, True)
    options = config.engine_options()
    assert isinstance(options, EngineOptions)
    assert (options.fused_qkv, options.cuda_graphs, options.fast_vae_decode, options.fp8,
            options.sequence_parallel) == (True, True, True, False, 1)


def test_without_the_flags_the_model_config_says_off_or_the_engines_default(monkeypatch, tmp_path):
    overrides = launcher_overrides(monkeypatch)
    assert overrides.environment() == {}
    options = instance_config({}, tmp_path).engine_options()
    # The fast VAE decode is left to the engine: on for CUDA (vae_fast.configure_vae).
    assert (options.fused_qkv, options.cuda_graphs, options.fast_vae_decode) == (False, False, None)
    assert launcher_overrides(monkeypatch, "--no-fast-vae-decode").environment() == {
        "FRAMEPACK_FAST_VAE_DECODE": "false"}
    assert instance_config({"FRAMEPACK_FAST_VAE_DECODE": "false"}, tmp_path).fast_vae_decode is False
    # The environment overrides the model config either way.
    assert instance_config({"FRAMEPACK_FUSED_QKV": "TRUE"}, tmp_path).engine_options().fused_qkv is True
    assert InstanceOverrides(cuda_graphs=False).environment() == {"FRAMEPACK_CUDA_GRAPHS": "false"}


@pytest.mark.parametrize("environment, message", [
    ({"FRAMEPACK_CUDA_GRAPHS": "true", "FRAMEPACK_DEVICE": "cpu"},
     "cuda_graphs=true is not allowed: CUDA graphs replay GPU work and this server runs on the CPU; serve on a GPU "
     "(device 'auto' or 'cuda:N') or leave cuda_graphs off"),
    ({"FRAMEPACK_CUDA_GRAPHS": "true", "FRAMEPACK_SEQUENCE_PARALLEL": "2"},
     "cuda_graphs=true is not allowed with sequence_parallel=2: the sequence-parallel ranks run their blocks "
     "without it; use one or the other"),
    ({"FRAMEPACK_FUSED_QKV": "true", "FRAMEPACK_SEQUENCE_PARALLEL": "4"},
     "fused_qkv=true is not allowed with sequence_parallel=4: the sequence-parallel ranks run their blocks "
     "without it; use one or the other"),
    ({"FRAMEPACK_FUSED_QKV": "yes"}, "fused_qkv='yes' is not allowed: expected 'true' or 'false'"),
    ({"FRAMEPACK_CUDA_GRAPHS": "1"}, "cuda_graphs='1' is not allowed: expected 'true' or 'false'"),
])
def test_the_instance_refuses_an_option_that_cannot_apply(tmp_path, environment, message):
    with pytest.raises(InstanceConfigError) as refused:
        instance_config(environment, tmp_path)
    assert str(refused.value) == message


def test_fused_qkv_is_refused_beside_a_lora_folder(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    with pytest.raises(InstanceConfigError, match="^fused_qkv=true is not allowed with a lora_dir: LoRAs adapt "
                                                  "to_q, to_k and to_v"):
        instance_config({"FRAMEPACK_FUSED_QKV": "true", "FRAMEPACK_LORA_DIR": str(loras)}, tmp_path)
    # Each alone is fine.
    assert instance_config({"FRAMEPACK_LORA_DIR": str(loras)}, tmp_path).lora_dir == loras


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("device, gpus", [("cpu", 0), ("cpu", 8), ("auto", 0)])
def test_cuda_graphs_on_a_cpu_server_is_refused_at_start(monkeypatch, capsys, tmp_path, device, gpus):
    monkeypatch.setattr(server_module, "nvidia_gpu_count", lambda: gpus)
    ports = [str(p) for p in free_ports(3)]
    code = cli.main(["--model-dir", str(tmp_path), "--grpc-port", ports[0], "--http-port", ports[1],
                     "--metrics-port", ports[2], "--device", device, "--cuda-graphs", "--quiet",
                     "--log-file", str(tmp_path / "server.log")])
    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "framepack-server: error: cuda_graphs=true is not allowed: CUDA graphs replay GPU work and this server "
        "runs on the CPU; serve on a GPU (device 'auto' or 'cuda:N') or leave cuda_graphs off"
    )
    assert all(port_free(int(p)) for p in ports)  # no tritonserver was started


def test_the_launcher_refuses_fused_qkv_with_a_lora_folder_before_starting(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    server = TritonServer(tmp_path, device="cpu", log_path=tmp_path / "server.log",
                          overrides=InstanceOverrides(fused_qkv=True, lora_dir=str(loras)),
                          grpc_port=free_ports(1)[0])
    with pytest.raises(ServerStartError, match="^fused_qkv=true is not allowed with a lora_dir"):
        server.start()
    assert server._process is None


@pytest.mark.server
@pytest.mark.slow
def test_a_server_started_with_fused_qkv_runs_jobs_with_it(tiny_bundle, tmp_path):
    grpc, http, metrics = free_ports(3)
    server = TritonServer(tiny_bundle, grpc_port=grpc, http_port=http, metrics_port=metrics, device="cpu",
                          log_path=tmp_path / "tritonserver.log", startup_timeout_s=300,
                          overrides=InstanceOverrides(fused_qkv=True))
    with server:
        events = list(stream.generate(server.grpc_address, WireRequest(
            load_image(SAMPLE_IMAGE).pixels, "a person waves", {**FAST_SETTINGS, "seconds": 2, "teacache": False})))
        log = server.log_text()
    final = events[-1]
    assert isinstance(final, stream.Final) and final.frame_count == 73
    assert (final.settings["fused_qkv"], final.settings["cuda_graphs"]) == (True, False)
    assert "fused q/k/v" in log
