"""Image + prompt → video, section by section, as a stream of typed events."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from . import conditioning, extension, guides, planner, prompt_schedule, provenance
from .attention import Attend
from .buckets import bucket_for, resize_and_center_crop
from .components import Components, encoder_dtype_for, load_components
from .errors import GenerationCancelled
from .events import Event, GenerationResult, PhaseStarted, SectionFinished, StepProgress, VideoPlanned
from .lora.apply import LoraUndoError, job_loras
from .lora.choices import LORAS_FIELD
from .lora.folder import LoraFolder
from .memory import MemoryManager, peak_memory, reset_peak_memory
from .memory.footprint import GIB
from .memory.modes import FASTEST_FIRST
from .presets import FLOW_PRESETS
from .preview import latent_preview
from .request import GenerationRequest
from .sampler import guided_flow, iterate_unipc
from .schedule import schedule_for
from .sequence_group import SequenceParallelGroup, WorkerSpec
from .sequence_parallel import check_heads_divide
from .settings import EngineOptions, SamplingSettings, SettingsError, triton_kernels_by_default
from .step_cache import step_cache_for
from .variants import SamplingVariant


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        model_dir: Path,
        options: EngineOptions | None = None,
        loras: LoraFolder | None = None,
    ):
        self.components = components
        self.loras = loras  # the instance's LoRA folder; None: requests may not name LoRAs
        self.device = device
        self.dtype = dtype
        self.model_dir = model_dir
        self.options = options if options is not None else EngineOptions()
        self.memory = MemoryManager(components, device)
        # One job at a time: a job places the weights and picks the attention backend.
        self._job_lock = threading.Lock()
        # The other ranks when options.sequence_parallel > 1 (sequence_group.py); None: this process alone.
        self.sequence_group: SequenceParallelGroup | None = None
        # Why this pipeline can no longer run jobs: its transformer's weights are no longer
        # the model's (a LoRA merge not undone exactly, lora/merge.py). Set, every job is refused.
        self.out_of_service: str | None = None

    @property
    def sampling(self) -> SamplingVariant:
        """The loaded transformer's sampling variant."""
        return self.options.sampling

    def close(self) -> None:
        """Stop the sequence-parallel workers, if any (the pipeline runs no job after this)."""
        if self.sequence_group is not None:
            self.sequence_group.close()
            self.sequence_group = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        options: EngineOptions | None = None,
        *,
        sampling: SamplingVariant | str | None = None,
        fused_kernels: bool | None = None,
        fp8: bool | None = None,
        fp32_output: bool | None = None,
        loras: LoraFolder | None = None,
        sequence_parallel: int | None = None,
    ) -> "Pipeline":
        """Load the five components from a model directory (docs/architecture.md layout).

        The transformer runs in bf16 on a GPU and fp32 on the CPU unless `dtype` says otherwise.
        `options` are the instance's (settings.EngineOptions); `sampling`, `fused_kernels` and
        `fp8` are shortcuts that replace the option of that name.
        `options.sampling` picks the transformer: "inverted" (transformer/) or "f1" (transformer_f1/).
        `fused_kernels` (default: on for CUDA when Triton is installed) runs the blocks on the
        Triton kernels of framepack_kernels/, the fastest exact path measured (benchmarks/results).
        `fp8` turns the blocks' linear layers into FP8 e4m3 (Hopper; not exact: relative
        error ~1e-4 per forward against bf16). With the fused kernels the activations are
        quantized by one Triton kernel per shared input: 0.834 vs 0.925 s per forward on an
        H100 (benchmarks/results). Off by default: bf16 is the exact path.
        `fp32_output` (default: on for a bf16/fp16 transformer) runs the final projection in
        fp32, as the FramePack demo does (FramePackTransformer.set_fp32_output).
        Weights load into host memory; the memory manager then places them for the
        instance's memory mode (a job that overrides it moves them again).
        `loras`: the folder whose LoRA files requests may name (framepack_backend/lora/); one
        folder, and its cache, may serve several pipelines (GPU groups).
        `sequence_parallel` > 1 starts that many ranks minus this one as worker processes,
        each holding the transformer on the next device, and splits every forward's blocks
        over them (framepack_backend/sequence_parallel.py); `close()` stops them.
        """
        shortcuts = {"sampling": sampling, "fused_kernels": fused_kernels, "fp8": fp8, "fp32_output": fp32_output,
                     "sequence_parallel": sequence_parallel}
        options = (options or EngineOptions()).replace(**{k: v for k, v in shortcuts.items() if v is not None})
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model_dir = Path(model_dir)
        components = load_components(
            model_dir, device="cpu", dtype=dtype, encoder_dtype=encoder_dtype_for(device),
            transformer_subfolder=options.sampling.transformer_folder,
        )
        options = configure_transformer(components.transformer, device, options)
        from .vae_fast import configure_vae  # diffusers' VAE classes: imported where the VAE loads

        options = configure_vae(components.vae, device, options)
        pipeline = cls(components, device, dtype, model_dir, options, loras)
        pipeline.model_identity  # noqa: B018 - computed at load, not during the first job
        if options.sequence_parallel > 1:
            pipeline.sequence_group = start_sequence_parallel(
                components.transformer, model_dir / options.sampling.transformer_folder, device, dtype, options
            )
        defaults = SamplingSettings()
        height, width = bucket_for(defaults.resolution, defaults.resolution, defaults.resolution)
        pipeline.memory.prepare(options.memory_mode, options.gpu_memory_preservation, height, width, defaults.window)
        return pipeline

    def generate(
        self,
        request: GenerationRequest,
        cancel: Callable[[], bool] | None = None,
    ) -> Iterator[Event]:
        """Yield the VideoPlanned, a PhaseStarted per phase, a StepProgress per step, a
        SectionFinished per section, then the GenerationResult.

        The request was checked when it was parsed (`request.parse_request`); its overrides
        of this instance's options are checked here, before any model runs (SettingsError),
        and so is whether its VAE decodes fit the memory there is (tiled if only that fits).
        `cancel` is polled before every model evaluation and every chunk of a VAE decode
        (GenerationCancelled). Jobs run one at a time: the iteration holds the pipeline's job lock.
        """
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
        if self.out_of_service is not None:
            # Every later job would run on other weights than the model's: refuse them all (INTERNAL).
            raise RuntimeError(f"this pipeline no longer runs its model: {self.out_of_service}")
        options = self.options.for_job(request.engine)
        guides.check_sampling(request.end_image, request.keyframes, request.settings, options.sampling)
        if request.loras and options.sequence_parallel > 1:
            # The worker ranks run the blocks with their own copy of the base weights.
            raise SettingsError(LORAS_FIELD, ",".join(map(str, request.loras)),
                                "no LoRAs on a server that splits jobs over sequence-parallel ranks")
        attend = Attend.for_setting(options.attention, self.device, self.dtype)
        return self._locked_run(request, options.replace(attention=attend.name), attend, cancel)

    def _locked_run(self, request: GenerationRequest, options: EngineOptions, attend: Attend, cancel) -> Iterator:
        try:
            yield from self._job_with_loras(request, options, attend, cancel)
        except LoraUndoError as e:
            self.out_of_service = str(e)
            raise

    def _job_with_loras(self, request: GenerationRequest, options: EngineOptions, attend: Attend,
                        cancel) -> Iterator:
        # The request's LoRAs on the transformer's layers for this job only (lora/apply.py).
        with self._job_lock, job_loras(self.components.transformer, self.loras, request.loras, self.device,
                                       self.dtype, resident=lambda: self.memory.mode == "resident") as loras:
            if self.sequence_group is not None:
                self.sequence_group.ensure_ready()
            source = extension.source_clip(request.video, options.sampling) if request.video is not None else None
            lora_bytes = {mode: loras.bytes_held(mode == "resident") for mode in FASTEST_FIRST}
            events = self._run(request, request.settings, options, attend, cancel, source, lora_bytes)
            try:
                for event in events if source is None else extension.new_frames_only(events, source):
                    if isinstance(event, GenerationResult):
                        if request.loras:
                            event.settings[LORAS_FIELD] = ",".join(map(str, request.loras))  # what the job ran with
                        event = dataclasses.replace(event, parameters=request.to_parameters(),
                                                    model=self.model_identity, versions=dict(provenance.versions()))
                    yield event
            finally:
                self.components.transformer.enable_cuda_graphs(False)  # a job's graphs hold memory

    @functools.cached_property
    def model_identity(self) -> dict:
        """The loaded model's identity (provenance.model_identity), computed once."""
        return provenance.model_identity(self.model_dir, self.options.sampling.transformer_folder)

    @torch.inference_mode()
    def _run(self, request: GenerationRequest, settings: SamplingSettings, options: EngineOptions,
             attend: Attend, cancel, source: extension.SourceClip | None = None,
             lora_bytes: dict[str, int] | None = None) -> Iterator:
        c = self.components
        # Video extension: the clip's frame in the start slot plays the start image.
        image = source.start_frame if source is not None else request.image
        timings: dict[str, float] = {}
        t_start = time.perf_counter()

        height, width = guides.start_size(image, settings.resolution)
        sampling = options.sampling
        window = settings.window
        plans = planner.plan_sections(settings.seconds, window, sampling)
        sections = len(plans)
        total_frames = planner.video_frame_count(sections, window)
        reset_peak_memory(self.device)
        mode = self.memory.prepare(
            options.memory_mode, options.gpu_memory_preservation, height, width, window,
            decode_latents=planner.max_decode_latents(sections, window, sampling, settings.blend_latents),
            lora_bytes=lora_bytes,
        )
        decode_plan = self.memory.decode
        if decode_plan is not None and not decode_plan.fits:
            raise SettingsError(
                "resolution", settings.resolution,
                f"a size whose VAE decode fits this server's memory: at {width}×{height} "
                f"(seconds={settings.seconds:g}) one section's decode needs about "
                f"{decode_plan.needed_bytes / GIB:.1f} GiB even in tiles, {decode_plan.budget / GIB:.1f} GiB "
                f"are available on {self.device.type}; ask for a lower resolution",
            )
        decode_tiled = decode_plan.tiled if decode_plan is not None else None
        # A graph replays the weight addresses it captured: only weights that stay put. The
        # job's record (GenerationResult.settings) then says whether it ran with graphs.
        options = options.replace(memory_mode=mode, cuda_graphs=options.cuda_graphs and mode == "resident")
        c.transformer.enable_cuda_graphs(options.cuda_graphs)
        timings["placement_s"] = time.perf_counter() - t_start
        yield VideoPlanned(
            sections=sections, window=window, latent_frames=planner.latent_frame_count(sections, window),
            frames=total_frames, fps=planner.FPS, width=width, height=height,
        )
        if image is None:  # text-to-video
            pixels = guides.init_pixels(settings.latent_init, height, width, settings.seed)
        else:
            pixels = resize_and_center_crop(image, width, height)
        yield PhaseStarted("text", 0, sections, time.perf_counter() - t_start)
        with self.memory.phase("text"):
            encoded = [
                conditioning.encode_prompt(
                    c.tokenizer, c.text_encoder, c.tokenizer_2, c.text_encoder_2, prompt, self.device, self.dtype
                ).cropped()
                for prompt in prompt_schedule.distinct_prompts(request.schedule)
            ]
            section_texts = [
                conditioning.mix_prompts(encoded, weights) for weights in prompt_schedule.section_prompt_weights(
                    request.schedule, sections, window, sampling, settings.prompt_blend_sections)
            ]
            text = section_texts[0]
            if settings.cfg == 1:
                negative = conditioning.zero_prompt_like(text)
            else:
                negative = conditioning.encode_prompt(
                    c.tokenizer, c.text_encoder, c.tokenizer_2, c.text_encoder_2, settings.negative_prompt,
                    self.device, self.dtype,
                ).cropped()
        yield PhaseStarted("image", 0, sections, time.perf_counter() - t_start)
        with self.memory.phase("image"):
            if source is None:
                start_latent = conditioning.encode_image_latent(c.vae, pixels, self.device).to(torch.float32)
            else:
                source_latents = extension.encode_source(c.vae, source, width, height, self.device, decode_tiled)
                start_latent = source_latents[:, :, :1]
            image_embeds = conditioning.encode_image_embeds(c.feature_extractor, c.image_encoder, pixels, self.device)
            job_guides, image_embeds = guides.encode_guides(
                c, request.end_frame, request.keyframes, settings, image_embeds, height, width, sections, sampling,
                self.device,
            )
        image_embeds = image_embeds.to(self.dtype)
        timings["encode_s"] = time.perf_counter() - t_start - timings["placement_s"]

        lh, lw = height // planner.VAE_SPATIAL_STRIDE, width // planner.VAE_SPATIAL_STRIDE
        flow = FLOW_PRESETS[settings.flow_preset]
        sigmas = schedule_for(settings.steps, window, lh, lw, mu_offset=flow.mu_offset, sigma=flow.sigma)
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        history = planner.initial_history(start_latent, sampling)
        if source is not None:
            history = extension.seed_history(history, source_latents, sampling)
        # Finished frames go straight into the uint8 video; only the frames the next
        # section's cross-fade still rewrites stay as float pixels (`seam`), so the cost
        # per section does not grow with the video's length.
        video: np.ndarray | None = None
        seam: torch.Tensor | None = None
        video_frames = 0  # frames decoded so far
        teacache = step_cache_for(settings, sampling)  # TeaCache, MagCache or none (step_cache.py)
        guidance = torch.full((1,), settings.gs * 1000.0, device=self.device, dtype=self.dtype)
        sampling_s = decode_s = 0.0
        # Re-decoding fewer previous-section latents than the reference's whole window cuts
        # decode work; the cross-fade shrinks to 4(k−1)+1 frames.
        blend = planner.blend_latent_count(window, settings.blend_latents)
        decoded_latents = 0

        for plan in plans:
            t_section = time.perf_counter()
            noise = torch.randn(
                (1, c.transformer.config.in_channels, window, lh, lw), generator=generator, dtype=torch.float32
            )
            clean, latents_2x, latents_4x = planner.context_from_history(history, start_latent, sampling)
            clean = job_guides.clean_latents(clean, plan)
            text = section_texts[plan.index]  # read by flow_fn below
            context = dict(
                image_embeds=image_embeds,
                indices_latents=plan.indices_latents.to(self.device),
                latents_clean=clean.to(self.device, self.dtype),
                indices_latents_clean=plan.indices_clean.to(self.device),
                latents_history_2x=latents_2x.to(self.device, self.dtype),
                indices_latents_history_2x=plan.indices_2x.to(self.device),
                latents_history_4x=latents_4x.to(self.device, self.dtype),
                indices_latents_history_4x=plan.indices_4x.to(self.device),
                guidance=guidance,
            )
            teacache.reset()

            def forward(x: torch.Tensor, sigma: float, text_embedding) -> torch.Tensor:
                return c.transformer(
                    hidden_states=x.to(self.dtype),
                    timestep=torch.full((1,), sigma * 1000.0, device=self.device, dtype=self.dtype),
                    encoder_hidden_states=text_embedding.hidden,
                    encoder_attention_mask=None,
                    pooled_projections=text_embedding.pooled,
                    teacache=teacache,
                    attend=attend,
                    **context,
                ).float()

            def flow_fn(x: torch.Tensor, sigma: float, step_index: int) -> torch.Tensor:
                teacache.begin_step(step_index)
                v = forward(x, sigma, text)
                if settings.cfg != 1:
                    v = guided_flow(v, forward(x, sigma, negative), settings.cfg, settings.rs)
                return v

            computed_before = teacache.computed_steps
            x0 = None
            yield PhaseStarted("sampling", plan.index + 1, sections, time.perf_counter() - t_start)
            with self.memory.phase("sampling"):
                for step_index, x0 in iterate_unipc(
                    flow_fn, noise.to(self.device), sigmas, variant=settings.solver, cancel=cancel,
                    model_dtype=self.dtype,
                ):
                    yield StepProgress(
                        section=plan.index + 1,
                        sections=sections,
                        step=step_index + 1,
                        steps=settings.steps,
                        elapsed_s=time.perf_counter() - t_start,
                        computed=teacache.computed_steps > computed_before,
                        preview=latent_preview(x0) if settings.preview else None,
                    )
                    computed_before = teacache.computed_steps
            sampling_s += time.perf_counter() - t_section

            t_decode = time.perf_counter()
            yield PhaseStarted("decode", plan.index + 1, sections, t_decode - t_start)
            history = planner.append_section(history, x0.cpu(), start_latent, plan.is_last, sampling)
            first, count = planner.decode_range(plan, history, window, sampling, blend)
            decoded_latents += count
            _check_cancel(cancel, "before the VAE decode")
            with self.memory.phase("decode"):
                decoded = conditioning.decode_latents(
                    c.vae, history[:, :, first : first + count].to(self.device), tiled=decode_tiled, cancel=cancel
                )
                decoded = decoded.float().cpu()
            overlap = planner.blend_frames(blend)
            if seam is None:
                pixels = decoded
                video_frames = decoded.shape[2]
            else:
                pixels = planner.soft_append(seam, decoded, overlap, sampling)
                video_frames += decoded.shape[2] - overlap
            inverted = sampling == "inverted"
            start_frame = total_frames - video_frames if inverted else video_frames - pixels.shape[2]
            seam = pixels[:, :, :overlap] if inverted else pixels[:, :, pixels.shape[2] - overlap :]
            section_frames = conditioning.frames_to_uint8(pixels)
            if video is None:
                video = np.empty((total_frames, *section_frames.shape[1:]), dtype=np.uint8)
            video[start_frame : start_frame + len(section_frames)] = section_frames
            decode_s += time.perf_counter() - t_decode
            yield SectionFinished(
                section=plan.index + 1,
                sections=sections,
                start_frame=start_frame,
                frames=section_frames,
                total_frames=total_frames,
                fps=planner.FPS,
            )

        _check_cancel(cancel, "after the last VAE decode")
        frames = video
        timings.update(sampling_s=sampling_s, decode_s=decode_s, total_s=time.perf_counter() - t_start)
        timings["computed_steps"] = teacache.computed_steps
        timings["skipped_steps"] = teacache.skipped_steps
        timings["decoded_latents"] = decoded_latents
        timings["memory"] = {"mode": mode, **peak_memory(self.device)}
        if decode_plan is not None:
            # Which decode ran and why: tiled only where the whole one was estimated not to fit.
            timings["memory"]["decode"] = {
                "tiled": decode_plan.tiled, "estimate_bytes": decode_plan.needed_bytes,
                "untiled_estimate_bytes": decode_plan.untiled_bytes, "available_bytes": decode_plan.budget,
            }
        yield GenerationResult(
            frames=frames,
            fps=planner.FPS,
            width=width,
            height=height,
            seed=settings.seed,
            settings={**settings.to_dict(), **options.to_dict(), "sampling": sampling.value},
            timings=timings,
        )


def start_sequence_parallel(
    transformer, transformer_dir: Path, device: torch.device, dtype: torch.dtype, options: EngineOptions
) -> SequenceParallelGroup:
    """Start the other ranks of a sequence-parallel group and run `transformer`'s blocks over it.

    The head count and, on GPUs, the visible GPU count are checked before any process
    starts (ValueError naming what is allowed).
    """
    check_heads_divide(transformer.config.num_attention_heads, options.sequence_parallel)
    if device.type == "cuda" and torch.cuda.device_count() < options.sequence_parallel:
        raise ValueError(f"sequence_parallel={options.sequence_parallel} is not allowed: it needs one GPU per "
                         f"rank and {torch.cuda.device_count()} are visible to this process")
    spec = WorkerSpec(str(transformer_dir), str(dtype).removeprefix("torch."), str(device),
                      bool(options.fused_kernels), options.fp8, bool(options.fp32_output))
    group = SequenceParallelGroup.start(spec, options.sequence_parallel)
    group.attach(transformer)
    return group


def _check_cancel(cancel: Callable[[], bool] | None, where: str) -> None:
    if cancel is not None and cancel():
        raise GenerationCancelled(f"cancelled {where}")


def configure_transformer(transformer, device: torch.device, options: EngineOptions) -> EngineOptions:
    """Apply the speed and precision options; asking for one this machine cannot run is an error, not a fallback.

    They are the instance's options, not a request's: a machine that cannot run one raises
    ValueError when the instance loads. Runs before the memory manager copies the weights to
    host memory, which keeps each tensor in the dtype it has then (the fp32 proj_out of
    `fp32_output` included). Returns the options as applied: `fused_kernels` and `fp32_output`
    left None get their defaults for this machine and these weights.
    """
    fp32_output = options.fp32_output
    if fp32_output is None:
        fp32_output = next(transformer.parameters()).dtype in (torch.bfloat16, torch.float16)
    transformer.set_fp32_output(fp32_output)
    if options.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True is not allowed: expected a CUDA device, not {device}")
    if options.fused_qkv:  # before FP8, which then quantizes the fused layers
        transformer.fuse_qkv()
    if options.fp8:
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError("fp8=True is not allowed: expected a GPU with FP8 tensor cores "
                             f"(compute capability 8.9 or newer), not {device}")
        transformer.quantize_fp8()
    fused_kernels = options.fused_kernels
    if fused_kernels is None:
        fused_kernels = triton_kernels_by_default(device.type)
    if fused_kernels:
        transformer.set_fused_kernels(True)
    return options.replace(fused_kernels=fused_kernels, fp32_output=fp32_output)
