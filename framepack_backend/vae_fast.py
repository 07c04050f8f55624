"""A faster decode for diffusers' HunyuanVideo VAE, same module and weights: `accelerate_vae(vae)`.

The decoder's convolutions are most of a decode and cuDNN runs fp16 3-D convolutions
in channels-last (NDHWC); diffusers' decoder keeps NCDHW activations, so every conv
pays layout conversions, and each causal conv first copies its input into a
replicate-padded tensor (F.pad). `accelerate_vae` swaps the classes of the decoder's
modules for subclasses that differ only in `forward` (parameters, state-dict keys and
the temporal/spatial tiling of `AutoencoderKLHunyuanVideo.decode` are untouched):

- activations stay in channels_last_3d from the decoder's input to its output;
- each causal conv reads one padded buffer whose interior its producer writes directly:
  GroupNorm + SiLU (`framepack_kernels.group_norm_silu` on CUDA, one read for the
  statistics and one read + write for the rest) or the nearest upsampling; only the
  thin replicate borders are copied afterwards;
- the mid-block's frame-causal attention runs one unmasked attention per frame over
  the frames up to it instead of building and adding a dense (THW)² mask.

Every value is computed as in diffusers up to float rounding: fp32 on the CPU equals
the stock decode within 1e-5 and fp16 on a GPU within fp16 noise (tests/test_vae_fast.py).
In training mode the modules run diffusers' forward.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import (
    HunyuanVideoCausalConv3d,
    HunyuanVideoDecoder3D,
    HunyuanVideoMidBlock3D,
    HunyuanVideoResnetBlockCausal3D,
    HunyuanVideoUpsampleCausal3D,
)
from torch import nn

from .settings import triton_kernels_by_default

CHANNELS_LAST = torch.channels_last_3d


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last_3d (itself when it already is)."""
    return x.contiguous(memory_format=CHANNELS_LAST)


def replicate_borders(buffer: torch.Tensor, padding: tuple[int, ...]) -> torch.Tensor:
    """Fill the borders of a padded (N, C, T, H, W) buffer from its interior, in place.

    `padding` is F.pad's (w_left, w_right, h_top, h_bottom, t_front, t_back). Replicate
    padding is separable (each padded voxel takes the value of the nearest interior one),
    so width borders are copied on interior rows, then height borders on whole rows,
    then time borders as whole frames; the result equals F.pad(interior, padding, "replicate").
    """
    w_left, w_right, h_top, h_bottom, t_front, t_back = padding
    frames, height, width = buffer.shape[2:]
    inner_frames = buffer[:, :, t_front : frames - t_back]
    rows = inner_frames[:, :, :, h_top : height - h_bottom]
    if w_left:
        rows[..., :w_left] = rows[..., w_left : w_left + 1]
    if w_right:
        rows[..., width - w_right :] = rows[..., width - w_right - 1 : width - w_right]
    if h_top:
        inner_frames[:, :, :, :h_top] = inner_frames[:, :, :, h_top : h_top + 1]
    if h_bottom:
        inner_frames[:, :, :, height - h_bottom :] = inner_frames[:, :, :, height - h_bottom - 1 : height - h_bottom]
    if t_front:
        buffer[:, :, :t_front] = buffer[:, :, t_front : t_front + 1]
    if t_back:
        buffer[:, :, frames - t_back :] = buffer[:, :, frames - t_back - 1 : frames - t_back]
    return buffer


def group_norm_silu_into(norm: nn.GroupNorm, x: torch.Tensor, out: torch.Tensor, silu: bool = True) -> None:
    """SiLU(GroupNorm(x)) (or the norm alone) written into `out`: the Triton kernel on CUDA, torch elsewhere."""
    if x.is_cuda:
        from framepack_kernels.group_norm_silu import group_norm_silu  # Triton only where it runs

        group_norm_silu(channels_last(x), norm.weight, norm.bias, norm.num_groups, norm.eps, silu=silu, out=out)
    else:
        # NCDHW: torch's channels-last GroupNorm on the CPU takes E[x²] − E[x]² (cancels).
        normed = nn.functional.group_norm(x.contiguous(), norm.num_groups, norm.weight, norm.bias, norm.eps)
        out.copy_(nn.functional.silu(normed) if silu else normed)


class FastCausalConv3d(HunyuanVideoCausalConv3d):
    """The causal conv reading a channels-last padded buffer its producer filled."""

    def padded_input(self, shape: torch.Size, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An uninitialised channels-last buffer for an input of `shape`, and the view of its interior."""
        w_left, w_right, h_top, h_bottom, t_front, t_back = self.time_causal_padding
        batch, channels, frames, height, width = shape
        buffer = torch.empty(
            (batch, channels, frames + t_front + t_back, height + h_top + h_bottom, width + w_left + w_right),
            dtype=like.dtype, device=like.device, memory_format=CHANNELS_LAST,
        )
        interior = buffer[:, :, t_front : t_front + frames, h_top : h_top + height, w_left : w_left + width]
        return buffer, interior

    def convolve(self, buffer: torch.Tensor) -> torch.Tensor:
        """The conv of a buffer from `padded_input` whose interior is written."""
        return self.conv(replicate_borders(buffer, self.time_causal_padding))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not any(self.time_causal_padding):
            return self.conv(channels_last(hidden_states))
        buffer, interior = self.padded_input(hidden_states.shape, hidden_states)
        interior.copy_(hidden_states)
        return self.convolve(buffer)


class FastResnetBlock(HunyuanVideoResnetBlockCausal3D):
    """norm → SiLU → conv twice plus the shortcut, each norm written into its conv's padded input."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training:  # dropout and autograd: diffusers' own forward
            return super().forward(hidden_states)
        x = channels_last(hidden_states)
        buffer, interior = self.conv1.padded_input(x.shape, x)
        group_norm_silu_into(self.norm1, x, interior)
        h = self.conv1.convolve(buffer)
        del buffer, interior  # freed before the next buffer: the peak stays at diffusers' or below
        buffer, interior = self.conv2.padded_input(h.shape, h)
        group_norm_silu_into(self.norm2, h, interior)
        h = self.conv2.convolve(buffer)
        residual = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(residual)


class FastUpsample(HunyuanVideoUpsampleCausal3D):
    """Nearest upsampling (the first frame in space only) written into the conv's padded input."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale_t, scale_h, scale_w = (int(f) for f in self.upsample_factor)
        batch, channels, frames, height, width = hidden_states.shape
        shape = (batch, channels, 1 + (frames - 1) * scale_t, height * scale_h, width * scale_w)
        buffer, interior = self.conv.padded_input(torch.Size(shape), hidden_states)
        # A nearest upsampling by whole factors repeats each voxel: the destination viewed
        # with one axis per repeat takes the source broadcast over those axes.
        first = interior[:, :, :1].unflatten(3, (height, scale_h)).unflatten(5, (width, scale_w))
        first.copy_(hidden_states[:, :, :1, :, None, :, None])
        if frames > 1:
            rest = interior[:, :, 1:].unflatten(2, (frames - 1, scale_t))
            rest = rest.unflatten(4, (height, scale_h)).unflatten(6, (width, scale_w))
            rest.copy_(hidden_states[:, :, 1:, None, :, None, :, None])
        return self.conv.convolve(buffer)


def frame_causal_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """diffusers' AttnProcessor2_0 over the voxels of x (N, C, T, H, W), frame t attending to frames ≤ t.

    That is the mid-block's mask (`prepare_causal_attention_mask`), which diffusers builds
    as a dense (THW)² tensor (1.8 GB in fp16 for a 5-frame tile at 704×544) and adds to
    every score; here each frame's queries attend to the keys of the frames up to it, one
    unmasked attention per frame: the same softmax over the same keys, without the mask
    or the masked-out scores. Returns (N, C, T, H, W).
    """
    batch, _, frames, height, width = x.shape
    tokens = height * width
    flat = channels_last(x).permute(0, 2, 3, 4, 1).flatten(1, 3)  # (N, THW, C), a view
    normed = attn.group_norm(flat.transpose(1, 2)).transpose(1, 2)
    query, key, value = attn.to_q(normed), attn.to_k(normed), attn.to_v(normed)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    attended = torch.empty_like(query)
    for frame in range(frames):
        rows, seen = slice(frame * tokens, (frame + 1) * tokens), slice(0, (frame + 1) * tokens)
        attended[:, :, rows] = nn.functional.scaled_dot_product_attention(query[:, :, rows], key[:, :, seen],
                                                                          value[:, :, seen])
    h = attended.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    h = attn.to_out[1](attn.to_out[0](h))
    if attn.residual_connection:
        h = h + flat
    h = h / attn.rescale_output_factor
    return h.unflatten(1, (frames, height, width)).permute(0, 4, 1, 2, 3)


def _frame_causal_applies(attn: Attention | None) -> bool:
    """Whether `frame_causal_attention` computes what `attn` would (its processor and options)."""
    return attn is None or (
        type(attn.processor) is AttnProcessor2_0 and attn.group_norm is not None and attn.spatial_norm is None
        and attn.norm_q is None and attn.norm_k is None
    )


class FastMidBlock(HunyuanVideoMidBlock3D):
    """Resnets and the frame-causal attention without the dense mask."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training or not all(_frame_causal_applies(attn) for attn in self.attentions):
            return super().forward(hidden_states)
        h = self.resnets[0](hidden_states)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                h = frame_causal_attention(attn, h)
            h = resnet(h)
        return h


class FastDecoder(HunyuanVideoDecoder3D):
    """The decoder in channels_last_3d from input to output; returns a contiguous (NCDHW) video."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(hidden_states)
        h = self.conv_in(channels_last(hidden_states))
        h = self.mid_block(h)
        for up_block in self.up_blocks:
            h = up_block(h)
        buffer, interior = self.conv_out.padded_input(h.shape, h)
        group_norm_silu_into(self.conv_norm_out, h, interior)
        return self.conv_out.convolve(buffer).contiguous()


FAST_CLASSES: dict[type, type] = {
    HunyuanVideoCausalConv3d: FastCausalConv3d,
    HunyuanVideoResnetBlockCausal3D: FastResnetBlock,
    HunyuanVideoUpsampleCausal3D: FastUpsample,
    HunyuanVideoMidBlock3D: FastMidBlock,
    HunyuanVideoDecoder3D: FastDecoder,
}
STOCK_CLASSES = {fast: stock for stock, fast in FAST_CLASSES.items()}


def _check_supported(decoder: nn.Module) -> None:
    """The fast forwards assume the public configuration's choices; refuse any other."""
    for name, module in decoder.named_modules():
        if isinstance(module, HunyuanVideoCausalConv3d) and module.pad_mode != "replicate":
            raise ValueError(f"accelerate_vae: {name} pads with {module.pad_mode!r}; only 'replicate' is supported")
        if isinstance(module, HunyuanVideoResnetBlockCausal3D) and not isinstance(module.nonlinearity, nn.SiLU):
            raise ValueError(f"accelerate_vae: {name} uses {type(module.nonlinearity).__name__}; only SiLU")
        if isinstance(module, HunyuanVideoUpsampleCausal3D) and any(
            float(f) != int(f) or f < 1 for f in module.upsample_factor
        ):
            raise ValueError(f"accelerate_vae: {name} upsamples by {module.upsample_factor}; whole factors only")
    if not isinstance(decoder.conv_act, nn.SiLU):
        raise ValueError(f"accelerate_vae: the decoder's conv_act is {type(decoder.conv_act).__name__}; only SiLU")


def accelerate_vae(vae: nn.Module, enabled: bool = True) -> nn.Module:
    """Run `vae`'s decoder on the fast forwards (enabled) or diffusers' own (not); returns `vae`.

    Only the classes of the decoder's modules change, in place: the same parameters,
    buffers and state-dict keys, so loading, placement and memory management see the
    module they loaded. Idempotent; the encoder is untouched.
    """
    decoder = vae.decoder
    if enabled:
        _check_supported(decoder)
    swap = FAST_CLASSES if enabled else STOCK_CLASSES
    for module in decoder.modules():
        replacement = swap.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return vae


def is_accelerated(vae: nn.Module) -> bool:
    return isinstance(vae.decoder, FastDecoder)


def configure_vae(vae: nn.Module, device: torch.device, options):
    """Apply `options.fast_vae_decode` (settings.EngineOptions) to `vae`; returns the options as applied.

    Unset, it is on where the fused GroupNorm's Triton kernel runs (settings.triton_kernels_by_default);
    asked for, it runs anywhere (on a CPU the torch path: same values, no gain).
    """
    enabled = options.fast_vae_decode
    if enabled is None:
        enabled = triton_kernels_by_default(device.type)
    accelerate_vae(vae, enabled)
    return options.replace(fast_vae_decode=enabled)
