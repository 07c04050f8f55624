"""Triton Python backend of the `framepack` model: a thin adapter over framepack_backend.

Parse a request into a GenerationRequest (the one boundary check), queue the job, stream
the engine's events back as responses. The wire protocol is documented in
framepack_server/protocol.py.
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
import time

import torch
import triton_python_backend_utils as pb_utils

from framepack_backend.memory import peak_memory
from framepack_backend.pipeline import Pipeline
from framepack_backend.settings import EngineOptions, SettingsError
from framepack_server.faults import take_fault
from framepack_server.instance import InstanceConfig
from framepack_server.jobs import Job, JobQueue, Outcome
from framepack_server.protocol import (
    EVENT_OUTPUT,
    IMAGE_INPUT,
    Status,
    WireResponse,
    describe_response,
    error_message,
    is_describe_request,
    parse_request,
    request_parameters,
)

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


class ResponseSender:
    """A request's response sender; tensors leave through DLPack (safe under numpy 1 and 2)."""

    def __init__(self, sender):
        self._sender = sender

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()

    def send(self, response: WireResponse) -> None:
        arrays = {EVENT_OUTPUT: response.event_bytes(), **response.tensors}
        outputs = [pb_utils.Tensor.from_dlpack(name, torch.from_numpy(a)) for name, a in arrays.items()]
        self._sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if response.final else 0)

    def fail(self, status: Status, text: str) -> None:
        error = pb_utils.TritonError(error_message(status, text), getattr(pb_utils.TritonError, ERROR_CODES[status]))
        self._sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def close(self) -> None:
        self._sender.send(flags=FINAL)


class JobMetrics:
    """Prometheus metrics of this instance's jobs, served on Triton's metrics port."""

    def __init__(self, instance: str, device):
        family = pb_utils.MetricFamily
        jobs = family("framepack_jobs_total", "Jobs that ended, by outcome", family.COUNTER)
        seconds = family("framepack_job_seconds_total", "Time spent running jobs", family.COUNTER)
        peak = family("framepack_last_job_peak_gpu_bytes", "Peak GPU memory of the last job", family.GAUGE)
        self._families = (jobs, seconds, peak)  # a family must outlive its metrics
        self._jobs = {o: jobs.Metric(labels={"instance": instance, "outcome": o.name.lower()}) for o in Outcome}
        self._seconds = seconds.Metric(labels={"instance": instance})
        self._peak = {
            kind: peak.Metric(labels={"instance": instance, "kind": kind}) for kind in ("allocated", "reserved")
        }
        self._device = device

    def observe(self, outcome: Outcome, seconds: float) -> None:
        self._jobs[outcome].increment(1)
        self._seconds.increment(seconds)
        peak = peak_memory(self._device)
        for kind, metric in self._peak.items():
            if peak[f"peak_{kind}_bytes"] is not None:
                metric.set(peak[f"peak_{kind}_bytes"])


def _input_image(request):
    """The `image` input as a numpy array, or None (optional in the config, because
    describe requests carry no image; parse_request refuses a video request without one)."""
    tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
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
        options = EngineOptions(sampling=config.sampling, fp8=config.fp8, sequence_parallel=config.sequence_parallel)
        pipeline = Pipeline.from_pretrained(config.model_dir, device=config.device, dtype=dtype, options=options)
        log.info(
            f"instance {args['model_instance_name']} loaded {config.model_dir} ({config.sampling}"
            f"{', FP8' if config.fp8 else ''}) on {config.device} "
            f"{f'with {config.sequence_parallel} sequence-parallel ranks ' if config.sequence_parallel > 1 else ''}"
            f"in {time.perf_counter() - start:.1f} s"
        )
        if pipeline.sequence_group is not None:
            pids = ", ".join(str(worker.pid) for worker in pipeline.sequence_group.workers)
            log.info(f"sequence-parallel worker pids (ranks 1 to {config.sequence_parallel - 1}): {pids}")
        if config.fault_injection:
            log.error("fault injection is enabled: requests may ask for a failure (tests only)")
        self._log = log
        self._pipeline = pipeline
        self._options, self._device = pipeline.options, pipeline.device
        self._fault_injection = config.fault_injection
        self._metrics = JobMetrics(args["model_instance_name"], pipeline.device)
        self._jobs = JobQueue(
            pipeline, log, config.max_queued_jobs, config.shutdown_requested, config.max_job_seconds,
            observe=self._metrics.observe,
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
            sender.send(describe_response())  # answered at once, even while a job runs
            return
        number = next(self._numbers)
        job_id = f"{number} ({request.request_id()})" if request.request_id() else str(number)
        fault = take_fault(parameters, self._fault_injection)
        job = Job(job_id, parse_request(_input_image(request), parameters), sender, fault)
        # The job's overrides of this instance's options, refused now rather than when it runs.
        self._options.for_job(job.request.engine, device_type=self._device.type)
        if not self._jobs.submit(job):
            sender.fail(Status.UNAVAILABLE, self._jobs.refusal())

    def finalize(self):
        # Triton calls this only once every request has had its final response, so no job
        # runs a decode here; the worker's clean-up after a job is joined. A job still
        # running at the exit timeout never gets here: tritonserver exits and the launcher
        # kills the stubs before reaping it (framepack_server/processes.py says why).
        self._jobs.close()
        self._pipeline.close()  # its sequence-parallel workers, if any
