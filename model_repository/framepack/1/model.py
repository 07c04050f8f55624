"""Triton Python backend of the `framepack` model: a thin adapter over framepack_backend.

Parse a request into a GenerationRequest (the one boundary check), queue the job, stream
the engine's events back as responses. The wire protocol is documented in
framepack_server/protocol.py. The one instance owns the server's job queue and a
pipeline per GPU group (framepack_server/jobs.py, groups.py).
"""

import os
import site
import sys


def _put_launcher_packages_first() -> None:
    """Make the launcher's Python environment importable, ahead of the system's.

    The stub's embedded interpreter starts isolated: its sys.path holds the system
    Python's folders only, not the virtual environment the server was started from. The
    launcher passes that environment's folders in FRAMEPACK_PYTHONPATH; `addsitedir`
    also runs their .pth files (an editable install needs them). They must come first,
    before numpy, torch or triton_python_backend_utils are imported.
    """
    before = list(sys.path)
    for folder in os.environ.get("FRAMEPACK_PYTHONPATH", "").split(os.pathsep):
        if folder:
            site.addsitedir(folder)
    added = [path for path in sys.path if path not in before]
    sys.path[:] = added + before


_put_launcher_packages_first()

import itertools
import json
import threading
import time

import torch
import triton_python_backend_utils as pb_utils

from framepack_backend.guides import check_sampling
from framepack_backend.lora.folder import LoraFolder
from framepack_backend.memory import peak_memory
from framepack_backend.pipeline import Pipeline
from framepack_backend.settings import SettingsError
from framepack_server.faults import take_fault
from framepack_server.groups import OnGroupDevice, plan_groups
from framepack_server.instance import InstanceConfig
from framepack_server.jobs import Job, JobQueue, Outcome, QueueLoad
from framepack_server.protocol import (
    END_IMAGE_INPUT,
    EVENT_OUTPUT,
    IMAGE_INPUT,
    KEYFRAMES_INPUT,
    VIDEO_INPUT,
    Status,
    WireResponse,
    describe_response,
    error_message,
    is_describe_request,
    parse_request,
    request_parameters,
)
from framepack_server.supervisor import exit_for_restart

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Names of pb_utils.TritonError codes; looked up late: the stub adds TritonError to
# pb_utils only after this file is imported.
ERROR_CODES = {
    Status.INVALID_ARGUMENT: "INVALID_ARG",
    Status.UNAVAILABLE: "UNAVAILABLE",
    # The stream carries only the message (which starts with the status word); the code
    # matters to Triton's statistics, and it has no deadline code.
    Status.DEADLINE_EXCEEDED: "UNAVAILABLE",
    Status.INTERNAL: "INTERNAL",
}


class TritonLog:
    """Job log lines go to the server's log."""

    def info(self, message: str) -> None:
        pb_utils.Logger.log_info(f"framepack: {message}")

    def error(self, message: str) -> None:
        pb_utils.Logger.log_error(f"framepack: {message}")


# Every call that goes through the stub to the Triton process (responses, cancellation
# checks, metrics) holds this lock: with one worker thread per GPU group, two groups that
# finish together would otherwise talk to the stub at once, and the Python backend has
# crashed (signal 11 in libtriton_python.so) when responses were sent from several threads.
STUB_CALLS = threading.Lock()


class ResponseSender:
    """A request's response sender; tensors leave through DLPack (safe under numpy 1 and 2)."""

    def __init__(self, sender):
        self._sender = sender

    def is_cancelled(self) -> bool:
        with STUB_CALLS:
            return self._sender.is_cancelled()

    def send(self, response: WireResponse) -> None:
        arrays = {EVENT_OUTPUT: response.event_bytes(), **response.tensors}
        outputs = [pb_utils.Tensor.from_dlpack(name, torch.from_numpy(a)) for name, a in arrays.items()]
        with STUB_CALLS:
            self._sender.send(pb_utils.InferenceResponse(output_tensors=outputs),
                              flags=FINAL if response.final else 0)

    def fail(self, status: Status, text: str) -> None:
        error = pb_utils.TritonError(error_message(status, text), getattr(pb_utils.TritonError, ERROR_CODES[status]))
        with STUB_CALLS:
            self._sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def close(self) -> None:
        with STUB_CALLS:
            self._sender.send(flags=FINAL)


class JobMetrics:
    """Prometheus metrics of the server's jobs and queue, served on Triton's metrics port.

    `framepack_queue_waiting_jobs` is what an autoscaler scales on (deploy/): jobs that
    wait because every GPU group is busy.
    """

    def __init__(self, instance: str, devices):
        family = pb_utils.MetricFamily
        jobs = family("framepack_jobs_total", "Jobs that ended, by outcome", family.COUNTER)
        seconds = family("framepack_job_seconds_total", "Time spent running jobs", family.COUNTER)
        peak = family("framepack_last_job_peak_gpu_bytes", "Peak GPU memory of the last job", family.GAUGE)
        waiting = family("framepack_queue_waiting_jobs", "Jobs waiting for a free GPU group", family.GAUGE)
        busy = family("framepack_busy_groups", "GPU groups running a job", family.GAUGE)
        groups = family("framepack_groups", "GPU groups that run jobs", family.GAUGE)
        self._families = (jobs, seconds, peak, waiting, busy, groups)  # a family must outlive its metrics
        self._jobs = {o: jobs.Metric(labels={"instance": instance, "outcome": o.name.lower()}) for o in Outcome}
        self._seconds = seconds.Metric(labels={"instance": instance})
        self._peak = {
            (device, kind): peak.Metric(labels={"instance": instance, "kind": kind, "device": str(device)})
            for device in devices if device.type == "cuda" for kind in ("allocated", "reserved")
        }
        self._load = {name: gauge.Metric(labels={"instance": instance})
                      for name, gauge in (("waiting", waiting), ("busy", busy), ("groups", groups))}

    def observe(self, outcome: Outcome, seconds: float) -> None:
        peaks = {key: peak_memory(key[0])[f"peak_{key[1]}_bytes"] for key in self._peak}
        with STUB_CALLS:
            self._jobs[outcome].increment(1)
            self._seconds.increment(seconds)
            for key, metric in self._peak.items():
                metric.set(peaks[key])

    def publish_load(self, load: QueueLoad) -> None:
        with STUB_CALLS:
            self._load["waiting"].set(load.waiting)
            self._load["busy"].set(load.busy)
            self._load["groups"].set(load.groups)


def _input_image(request, name: str = IMAGE_INPUT):
    """A tensor input (`image`, `video`, `end_image`, `keyframes`) as a numpy array, or None:
    all are optional (describe requests carry none; without `image` or `video` a job is
    text-to-video)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    # DLPack, not as_numpy(): the latter returns empty data under numpy 2. Copy, because
    # the request's memory is released once execute() returns and the job runs later.
    return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy().copy()


class TritonPythonModel:
    def initialize(self, args):
        if not pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise pb_utils.TritonModelException("the framepack model streams: its config must set decoupled: true")
        config = InstanceConfig.from_triton(args, os.environ)
        log = TritonLog()
        start = time.perf_counter()
        dtype = getattr(torch, config.dtype) if config.dtype else None
        options = config.engine_options()
        groups = plan_groups(config.device, config.groups, torch.cuda.device_count(),
                             gpus_per_group=config.sequence_parallel)
        # One LoRA folder for all groups: its host cache holds each file's factors once.
        loras = LoraFolder(config.lora_dir) if config.lora_dir is not None else None
        pipelines = [
            Pipeline.from_pretrained(config.model_dir, device=group.device, dtype=dtype, options=options, loras=loras)
            for group in groups
        ]
        log.info(
            f"instance {args['model_instance_name']} loaded {config.model_dir} ({config.sampling}"
            f"{', FP8' if config.fp8 else ''}{', fused q/k/v' if config.fused_qkv else ''}"
            f"{', CUDA graphs' if config.cuda_graphs else ''}"
            f"{', fast VAE decode' if pipelines[0].options.fast_vae_decode else ''}"
            f") for {len(groups)} GPU group(s)"
            f"{f' of {config.sequence_parallel} sequence-parallel ranks' if config.sequence_parallel > 1 else ''}: "
            f"{'; '.join(group.describe() for group in groups)}; in {time.perf_counter() - start:.1f} s"
        )
        for group, pipeline in zip(groups, pipelines):
            if pipeline.sequence_group is not None:
                pids = ", ".join(str(worker.pid) for worker in pipeline.sequence_group.workers)
                log.info(f"group {group.index}: sequence-parallel worker pids (ranks 1 to "
                         f"{config.sequence_parallel - 1}): {pids}")
        if config.fault_injection:
            log.error("fault injection is enabled: requests may ask for a failure (tests only)")
        self._log = log
        # Every group loads the same options on the same kind of device, so the first one's
        # decide which job overrides are allowed and which LoRAs requests may name.
        self._pipelines = pipelines
        self._options, self._device, self._loras = pipelines[0].options, pipelines[0].device, pipelines[0].loras
        self._fault_injection = config.fault_injection
        self._metrics = JobMetrics(args["model_instance_name"], [pipeline.device for pipeline in pipelines])
        self._jobs = JobQueue(
            [OnGroupDevice(pipeline) for pipeline in pipelines], log, config.max_queued_jobs,
            config.shutdown_requested, config.max_job_seconds,
            observe=self._metrics.observe, publish_load=self._metrics.publish_load,
            on_out_of_service=lambda reason: exit_for_restart(reason, log.error),
        )
        self._numbers = itertools.count(1)

    def execute(self, requests):
        for request in requests:
            sender = ResponseSender(request.get_response_sender())
            try:
                self._admit(request, sender)
            except SettingsError as e:
                self._jobs.refuse_invalid(sender, e)
            except Exception as e:  # one malformed request must not take the others down
                self._log.error(f"request refused: {type(e).__name__}: {e}")
                sender.fail(Status.INTERNAL, f"{type(e).__name__}: {e}")
        return None

    def _admit(self, request, sender: ResponseSender) -> None:
        parameters = request_parameters(request.parameters())
        if is_describe_request(parameters):
            loras = self._loras.describe() if self._loras is not None else []
            sender.send(describe_response(loras, self._options.sampling))  # answered at once, even while a job runs
            return
        number = next(self._numbers)
        job_id = f"{number} ({request.request_id()})" if request.request_id() else str(number)
        fault = take_fault(parameters, self._fault_injection)
        parsed = parse_request(_input_image(request), parameters, self._loras,
                               video=_input_image(request, VIDEO_INPUT),
                               end_image=_input_image(request, END_IMAGE_INPUT),
                               keyframes=_input_image(request, KEYFRAMES_INPUT))
        job = Job(job_id, parsed, sender, fault)
        # The job's overrides of this instance's options, refused now rather than when it runs.
        self._options.for_job(job.request.engine, device_type=self._device.type)
        check_sampling(parsed.end_image, parsed.keyframes, parsed.settings, self._options.sampling)
        if not self._jobs.submit(job):
            sender.fail(Status.UNAVAILABLE, self._jobs.refusal())

    def finalize(self):
        # Triton calls this only once every request has had its final response, so no job
        # runs a decode here; the worker's clean-up after a job is joined. A job still
        # running at the exit timeout never gets here: tritonserver exits and the launcher
        # kills the stubs before reaping it (framepack_server/processes.py says why).
        self._jobs.close()
        for pipeline in self._pipelines:
            pipeline.close()  # its sequence-parallel workers, if any
