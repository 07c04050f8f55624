"""Where and how the Triton model instance runs: model directory, device, dtype, FP8,
fused q/k/v, CUDA graphs, GPU groups, sequence-parallel degree, queue size, time limit per job.

Values come from the model config's `parameters`, each overridable by an environment
variable of the server process (the launcher sets them), so one `config.pbtxt` serves
the Docker image (weights in /models), the embedded CPU demo and a GPU cluster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from framepack_backend.variants import VARIANT_NAMES, SamplingVariant

if TYPE_CHECKING:  # the engine's settings import torch; the launcher does not need it
    from framepack_backend.settings import EngineOptions

DTYPES = ("bfloat16", "float16", "float32")

ENV_OVERRIDES = {
    "model_dir": "FRAMEPACK_MODEL_DIR",
    "device": "FRAMEPACK_DEVICE",
    "dtype": "FRAMEPACK_DTYPE",
    "max_queued_jobs": "FRAMEPACK_MAX_QUEUED_JOBS",
    "max_job_seconds": "FRAMEPACK_MAX_JOB_SECONDS",
    "sampling": "FRAMEPACK_SAMPLING",
    "fp8": "FRAMEPACK_FP8",
    "lora_dir": "FRAMEPACK_LORA_DIR",
    "groups": "FRAMEPACK_GROUPS",
    "sequence_parallel": "FRAMEPACK_SEQUENCE_PARALLEL",
    "fused_qkv": "FRAMEPACK_FUSED_QKV",
    "cuda_graphs": "FRAMEPACK_CUDA_GRAPHS",
    "fast_vae_decode": "FRAMEPACK_FAST_VAE_DECODE",
}
FLAG_VALUES = {"true": True, "false": False}
# Set by the launcher only when started for fault-injection tests (see faults.py); not a
# config parameter, so a model repository cannot switch it on.
FAULT_INJECTION_ENV = "FRAMEPACK_FAULT_INJECTION"
# Created by the launcher when it stops the server (see jobs.py).
SHUTDOWN_FILE_ENV = "FRAMEPACK_SHUTDOWN_FILE"
DEVICES = "'auto', 'cpu' or 'cuda:N'"


class InstanceConfigError(ValueError):
    pass


def check_device(device: str) -> str:
    """`device` if it is 'auto', 'cpu' or 'cuda:N'; the rule for the launcher and the instance alike."""
    if device in ("auto", "cpu") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise InstanceConfigError(f"device={device!r} is not allowed: expected {DEVICES}")


@dataclass(frozen=True)
class InstanceOverrides:
    """What one server sets over the model config's parameters; None (or False) leaves the config's value.

    The launcher hands these to the backend stub as environment variables (`environment`),
    named by ENV_OVERRIDES, the table `InstanceConfig.from_triton` reads them back with.
    """

    max_queued_jobs: int | None = None
    max_job_seconds: float | None = None  # 0: no limit
    sampling: str | None = None  # a VARIANT_NAMES entry
    fp8: bool | None = None
    lora_dir: str | None = None  # the folder whose LoRA files requests may name
    groups: int | None = None  # GPU groups that run jobs (groups.py)
    sequence_parallel: int | None = None  # processes (one device each) per job; must divide the heads
    fused_qkv: bool | None = None  # q/k/v as one GEMM (EngineOptions.fused_qkv)
    cuda_graphs: bool | None = None  # the blocks replayed from CUDA graphs (EngineOptions.cuda_graphs)
    fast_vae_decode: bool | None = None  # the VAE decoder's speed-up (EngineOptions.fast_vae_decode)
    fault_injection: bool = False  # lets requests ask for failures (faults.py; tests only)

    def environment(self) -> dict[str, str]:
        env = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "fault_injection":
                if value:
                    env[FAULT_INJECTION_ENV] = "1"
            elif isinstance(value, bool):
                env[ENV_OVERRIDES[field.name]] = "true" if value else "false"
            elif value is not None:
                env[ENV_OVERRIDES[field.name]] = str(value)
        return env


@dataclass(frozen=True)
class InstanceConfig:
    model_dir: Path
    device: str  # "auto" (every visible GPU, else the CPU), "cpu" or "cuda:N"
    dtype: str | None  # None: the engine's default for the device
    max_queued_jobs: int
    max_job_seconds: float | None = None  # None: no limit
    # Created by the launcher when it stops the server (SHUTDOWN_FILE_ENV; see jobs.py).
    shutdown_file: Path | None = None
    fault_injection: bool = False
    sampling: SamplingVariant = SamplingVariant.INVERTED
    fp8: bool = False  # the transformer blocks' linear layers in FP8 e4m3 (Hopper)
    lora_dir: Path | None = None  # None: requests may not name LoRAs
    groups: int | None = None  # GPU groups that run jobs; None: one per visible GPU (groups.py)
    # Ranks splitting each forward over attention heads: this instance (rank 0) and its
    # worker processes (framepack_backend/sequence_group.py), on consecutive devices.
    sequence_parallel: int = 1
    fused_qkv: bool = False  # each attention's q/k/v projections as one GEMM
    cuda_graphs: bool = False  # the transformer blocks replayed from CUDA graphs (GPU, resident jobs)
    fast_vae_decode: bool | None = None  # None: the engine's default (on for CUDA with Triton)

    def shutdown_requested(self) -> bool:
        return self.shutdown_file is not None and self.shutdown_file.exists()

    def engine_options(self) -> "EngineOptions":
        """The pipelines' EngineOptions (imports the engine's settings, and so torch, only when called)."""
        from framepack_backend.settings import EngineOptions

        return EngineOptions(sampling=self.sampling, fp8=self.fp8, fused_qkv=self.fused_qkv,
                             cuda_graphs=self.cuda_graphs, fast_vae_decode=self.fast_vae_decode,
                             sequence_parallel=self.sequence_parallel)

    @classmethod
    def from_triton(cls, args: Mapping[str, str], environ: Mapping[str, str]) -> "InstanceConfig":
        """From the `args` Triton passes to `initialize` and the server's environment."""
        parameters = json.loads(args["model_config"]).get("parameters", {})

        def value(key: str, default: str) -> str:
            env = environ.get(ENV_OVERRIDES[key], "").strip()
            if env:
                return env
            return parameters.get(key, {}).get("string_value", default).strip() or default

        device = check_device(value("device", "auto"))
        if device == "auto" and args.get("model_instance_kind") == "GPU":
            # A repository that makes one instance per GPU (KIND_GPU) gives each its own.
            device = f"cuda:{args.get('model_instance_device_id', '0')}"

        dtype = value("dtype", "auto")
        if dtype not in DTYPES + ("auto",):
            raise InstanceConfigError(f"dtype={dtype!r} is not allowed: expected 'auto' or one of {', '.join(DTYPES)}")

        queued = value("max_queued_jobs", "4")
        if not queued.isdigit() or int(queued) < 1:
            raise InstanceConfigError(f"max_queued_jobs={queued!r} is not allowed: expected an integer >= 1")

        job_seconds = value("max_job_seconds", "0")
        try:
            max_job_seconds = float(job_seconds)
        except ValueError:
            max_job_seconds = -1.0
        if not (0 <= max_job_seconds < float("inf")):
            raise InstanceConfigError(
                f"max_job_seconds={job_seconds!r} is not allowed: expected seconds >= 0 (0: no limit)"
            )

        sampling = value("sampling", "inverted")
        if sampling not in VARIANT_NAMES:
            raise InstanceConfigError(
                f"sampling={sampling!r} is not allowed: expected one of {', '.join(VARIANT_NAMES)}"
            )

        def flag(key: str) -> bool:
            text = value(key, "false").lower()
            if text not in FLAG_VALUES:
                raise InstanceConfigError(f"{key}={text!r} is not allowed: expected 'true' or 'false'")
            return FLAG_VALUES[text]

        fp8, fused_qkv, cuda_graphs = flag("fp8"), flag("fused_qkv"), flag("cuda_graphs")
        fast_vae_decode = None if value("fast_vae_decode", "auto").lower() == "auto" else flag("fast_vae_decode")

        groups = value("groups", "auto")
        if groups != "auto" and not (groups.isdigit() and int(groups) >= 1):
            raise InstanceConfigError(f"groups={groups!r} is not allowed: expected 'auto' or an integer >= 1")
        sequence_parallel = value("sequence_parallel", "1")
        if not sequence_parallel.isdigit() or int(sequence_parallel) < 1:
            raise InstanceConfigError(
                f"sequence_parallel={sequence_parallel!r} is not allowed: expected an integer >= 1 "
                "that divides the transformer's attention heads"
            )

        model_dir = Path(value("model_dir", "/models")).expanduser()
        if not model_dir.is_dir():
            raise InstanceConfigError(
                f"model_dir={str(model_dir)!r} is not a directory: set FRAMEPACK_MODEL_DIR or the "
                "config parameter model_dir to a FramePack model directory (docs/architecture.md)"
            )
        lora_text = value("lora_dir", "")
        lora_dir = Path(lora_text).expanduser() if lora_text else None
        if lora_dir is not None and not lora_dir.is_dir():
            raise InstanceConfigError(
                f"lora_dir={lora_text!r} is not a directory: set FRAMEPACK_LORA_DIR or the config parameter "
                "lora_dir to a folder of LoRA .safetensors files, or leave it empty for none"
            )
        check_speed_options(fused_qkv, cuda_graphs, on_gpu=None if device == "auto" else device != "cpu",
                            sequence_parallel=int(sequence_parallel), lora_dir=lora_text or None)
        shutdown_file = environ.get(SHUTDOWN_FILE_ENV, "").strip()
        return cls(
            model_dir,
            device,
            None if dtype == "auto" else dtype,
            int(queued),
            max_job_seconds or None,
            Path(shutdown_file) if shutdown_file else None,
            environ.get(FAULT_INJECTION_ENV, "") == "1",
            SamplingVariant(sampling),
            fp8,
            lora_dir,
            None if groups == "auto" else int(groups),
            int(sequence_parallel),
            fused_qkv=fused_qkv,
            cuda_graphs=cuda_graphs,
            fast_vae_decode=fast_vae_decode,
        )


def check_speed_options(fused_qkv: bool, cuda_graphs: bool, *, on_gpu: bool | None, sequence_parallel: int,
                        lora_dir: str | None) -> None:
    """Refuse the speed options where they would not apply (InstanceConfigError), rather than ignore them.

    `on_gpu`: whether the instance runs on a GPU (None: not known yet, device 'auto'; the
    engine then refuses CUDA graphs on a CPU when it loads). Read by the instance and,
    before it starts tritonserver, by the launcher.
    """
    if cuda_graphs and on_gpu is False:
        raise InstanceConfigError(
            "cuda_graphs=true is not allowed: CUDA graphs replay GPU work and this server runs on the CPU; "
            "serve on a GPU (device 'auto' or 'cuda:N') or leave cuda_graphs off"
        )
    for name, on in (("cuda_graphs", cuda_graphs), ("fused_qkv", fused_qkv)):
        if on and sequence_parallel > 1:
            # The worker ranks (sequence_group.WorkerSpec) load their blocks without either option.
            raise InstanceConfigError(
                f"{name}=true is not allowed with sequence_parallel={sequence_parallel}: the sequence-parallel "
                "ranks run their blocks without it; use one or the other"
            )
    if fused_qkv and lora_dir:
        raise InstanceConfigError(
            "fused_qkv=true is not allowed with a lora_dir: LoRAs adapt to_q, to_k and to_v, which fused_qkv "
            "replaces by one layer per attention; leave one of them off"
        )
