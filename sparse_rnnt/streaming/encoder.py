"""One batched Emformer chunk step over streams at different positions.

torchaudio's ``RNNT.transcribe_streaming`` (``_EmformerImpl.infer``) cannot batch arbitrary
streams: each layer reads the number of valid left-context keys and memory slots from the
*first* batch row's ``past_length`` (``state[3][0][0].item()``) and applies it to every row, and
its key padding mask is only consistent when the longest row fills the whole segment. So
streams that started at different times, or a stream whose last segment is partial, would be
encoded differently from the same stream alone or in the full-utterance path.

:func:`encoder_step` runs the same layers with the same weights, but keeps every stream's
left-context keys/values and memory in fixed-size slots and masks, per row, the slots that are
not filled yet and the padded frames of a partial last segment. Masked keys get the same
``-1e8`` score torchaudio uses, so they receive exactly zero attention weight; the result equals
torchaudio's single-stream ``infer`` (and the full-utterance ``transcribe``) up to float
rounding. The attention follows ``_EmformerAttention._forward_impl`` /
``_EmformerLayer.infer`` of torchaudio 2.x step for step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchaudio.models import RNNT


@dataclass
class EncoderState:
    """One stream's Emformer state, unbatched.

    ``key``, ``value``: ``[layers, left_context, D]`` (the last ``min(past, left_context)`` slots
    are valid); ``memory``: ``[layers, max_memory, D]`` (the last ``min(ceil(past / segment),
    max_memory)`` slots are valid); ``past``: Emformer frames (after time reduction) processed.
    """

    key: torch.Tensor
    value: torch.Tensor
    memory: torch.Tensor
    past: int = 0


@dataclass(frozen=True)
class EncoderGeometry:
    """Chunk sizes of an Emformer RNN-T, in input (10 ms) frames unless named ``*_reduced``."""

    segment: int  # input frames per chunk (config.segment_length)
    right_context: int  # look-ahead input frames
    stride: int  # time reduction stride
    left_context_reduced: int
    max_memory: int
    layers: int
    width: int  # transformer width D

    @property
    def chunk(self) -> int:
        """Input frames one encoder call consumes: segment + look-ahead."""
        return self.segment + self.right_context

    @property
    def segment_reduced(self) -> int:
        return self.segment // self.stride


def geometry(rnnt: RNNT) -> EncoderGeometry:
    """Read the chunk geometry from torchaudio's Emformer encoder."""
    enc = rnnt.transcriber
    em = enc.transformer
    stride = enc.time_reduction.stride
    return EncoderGeometry(
        segment=em.segment_length * stride,
        right_context=em.right_context_length * stride,
        stride=stride,
        left_context_reduced=em.left_context_length,
        max_memory=em.max_memory_size,
        layers=len(em.emformer_layers),
        width=enc.output_linear.in_features,
    )


def initial_state(geo: EncoderGeometry, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> EncoderState:
    """The state before the first chunk (all slots empty)."""
    kv = (geo.layers, geo.left_context_reduced, geo.width)
    return EncoderState(
        key=torch.zeros(kv, device=device, dtype=dtype),
        value=torch.zeros(kv, device=device, dtype=dtype),
        memory=torch.zeros(geo.layers, geo.max_memory, geo.width, device=device, dtype=dtype),
        past=0,
    )


def _slot_mask(valid: torch.Tensor, slots: int) -> torch.Tensor:
    """``[B]`` valid counts -> ``[B, slots]`` True where a slot is empty (valid slots are last)."""
    idx = torch.arange(slots, device=valid.device)
    return idx[None, :] < (slots - valid)[:, None]


def encoder_step(
    rnnt: RNNT,
    chunk: torch.Tensor,
    valid_frames: torch.Tensor,
    states: list[EncoderState],
) -> tuple[torch.Tensor, list[EncoderState]]:
    """Encode one chunk of each of ``B`` streams in one batched call.

    ``chunk [B, segment + right_context, F]``: each row's next ``segment`` input frames followed by
    its ``right_context`` look-ahead frames (zeros past the end of the utterance, as in the
    full-utterance path). ``valid_frames [B]``: how many of the ``segment`` frames are real (a
    multiple of the time-reduction stride; less than ``segment`` only for a last segment).
    ``states``: one :class:`EncoderState` per row.

    Returns the encoder output ``[B, segment // stride, encoding_dim]`` (rows past
    ``valid_frames // stride`` are padding) and the updated states.
    """
    return per_stream(functools.partial(encoder_step_tensors, rnnt), chunk, valid_frames, states,
                      geometry(rnnt).segment_reduced)


StackedStep = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def per_stream(step: StackedStep, chunk: torch.Tensor, valid_frames: torch.Tensor, states: list[EncoderState],
               segment_reduced: int) -> tuple[torch.Tensor, list[EncoderState]]:
    """Run a stacked-state step (``step(chunk, valid, past, key, value, memory)``, the arguments
    of :func:`encoder_step_tensors` without the model) on per-stream states: stack them, step,
    and copy each row's new state out. Returns a copy of the encoder output too, so nothing
    returned aliases buffers the step may reuse."""
    batch = chunk.size(0)
    if len(states) != batch:
        raise ValueError(f"{len(states)} states for a batch of {batch}")
    device = chunk.device
    past = [s.past for s in states]
    stacked = (torch.stack([getattr(s, name) for s in states], dim=2) for name in ("key", "value", "memory"))
    out, keys, vals, mems = step(chunk, valid_frames.to(device), torch.tensor(past, device=device), *stacked)
    return out.clone(), unstack_states(keys, vals, mems, past, segment_reduced)


def unstack_states(
    keys: torch.Tensor, vals: torch.Tensor, mems: torch.Tensor, past: list[int], segment_reduced: int
) -> list[EncoderState]:
    """Per-row :class:`EncoderState` of stacked ``[layers, slots, B, D]`` states. Each row is
    copied into its own memory: the stacked tensors may be buffers that the next step overwrites
    (a one-row slice would be contiguous, so ``contiguous()`` alone would not copy it)."""
    return [
        EncoderState(
            key=keys[:, :, b].clone(memory_format=torch.contiguous_format),
            value=vals[:, :, b].clone(memory_format=torch.contiguous_format),
            memory=mems[:, :, b].clone(memory_format=torch.contiguous_format),
            past=p + segment_reduced,
        )
        for b, p in enumerate(past)
    ]


def encoder_step_tensors(
    rnnt: RNNT,
    chunk: torch.Tensor,
    valid_frames: torch.Tensor,
    past: torch.Tensor,
    key_state: torch.Tensor,
    val_state: torch.Tensor,
    mem_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`encoder_step` on stacked states, with no host synchronization and shapes fixed by
    ``B`` alone, so that a CUDA graph can capture it.

    ``chunk [B, chunk, F]``, ``valid_frames [B]`` and ``past [B]`` (Emformer frames already
    processed) on the model's device; ``key_state``/``val_state [layers, lc, B, D]``,
    ``mem_state [layers, M, B, D]``. Returns ``out [B, segment // stride, encoding_dim]`` and the
    new stacked key, value and memory states (same shapes as the inputs).
    """
    enc = rnnt.transcriber
    em = enc.transformer
    geo = geometry(rnnt)
    batch = chunk.size(0)
    if chunk.size(1) != geo.chunk:
        raise ValueError(f"chunk has {chunk.size(1)} frames, the model needs {geo.chunk}")
    device = chunk.device
    seg = geo.segment_reduced
    lc = geo.left_context_reduced
    mem_slots = geo.max_memory

    x = enc.input_linear(chunk)
    lengths = torch.full((batch,), geo.chunk, device=device, dtype=torch.int64)
    x, _ = enc.time_reduction(x, lengths)  # [B, seg + rc, D]
    x = x.permute(1, 0, 2)  # [T, B, D], torchaudio's layout
    utterance, right_context = x[:seg], x[seg:]
    rc = right_context.size(0)

    valid = (valid_frames // geo.stride).clamp(0, seg)

    # Keys are laid out [memory, right context, left context, utterance].
    mem_valid = torch.clamp(torch.div(past + seg - 1, seg, rounding_mode="floor"), max=mem_slots)
    pad_mask = torch.cat(
        [
            _slot_mask(mem_valid, mem_slots),
            torch.zeros(batch, rc, dtype=torch.bool, device=device),
            _slot_mask(torch.clamp(past, max=lc), lc),
            torch.arange(seg, device=device)[None, :] >= valid[:, None],
        ],
        dim=1,
    )  # [B, K]

    mems = (
        em.memory_op(utterance.permute(1, 2, 0)).permute(2, 0, 1)
        if em.use_mem
        else utterance.new_zeros(0, batch, utterance.size(2))
    )
    new_key, new_val, new_mem = [], [], []
    for i, layer in enumerate(em.emformer_layers):
        attn = layer.attention
        normed = layer.layer_norm_input(torch.cat([right_context, utterance]))
        n_rc, n_utt = normed[:rc], normed[rc:]
        if layer.use_mem:
            summary = layer.memory_op(n_utt.permute(1, 2, 0)).permute(2, 0, 1)[:1]
        else:
            summary = n_utt.new_zeros(0, batch, n_utt.size(2))
        pre_mems = mem_state[i]
        query = attn.emb_to_query(torch.cat([n_rc, n_utt, summary]))
        k, v = attn.emb_to_key_value(torch.cat([pre_mems, n_rc, n_utt])).chunk(chunks=2, dim=2)
        split = pre_mems.size(0) + rc
        key = torch.cat([k[:split], key_state[i], k[split:]])
        value = torch.cat([v[:split], val_state[i], v[split:]])

        heads, d = attn.num_heads, attn.input_dim
        q_len, k_len = query.size(0), key.size(0)
        qh, kh, vh = (
            t.contiguous().view(-1, batch * heads, d // heads).transpose(0, 1) for t in (query, key, value)
        )
        scores = torch.bmm(qh * attn.scaling, kh.transpose(1, 2)).float()
        if summary.size(0):  # the summary query does not look at memory (torchaudio's infer mask)
            blocked = torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
            blocked[-1, : pre_mems.size(0)] = True
            scores = scores.masked_fill(blocked[None], attn.negative_inf)
        scores = scores.view(batch, heads, q_len, k_len).masked_fill(pad_mask[:, None, None, :], attn.negative_inf)
        probs = torch.softmax(scores.view(batch * heads, q_len, k_len), dim=-1).type_as(qh)
        out = torch.bmm(probs, vh).transpose(0, 1).contiguous().view(q_len, batch, d)
        out = attn.out_proj(out)
        s_len = summary.size(0)
        rc_utt_out, out_mems = out[: q_len - s_len], out[q_len - s_len :]
        out_mems = torch.tanh(out_mems) if attn.tanh_on_mem else torch.clamp(out_mems, min=-10, max=10)

        # State for the next chunk: the newest lc keys/values and max_memory memory vectors.
        all_k = torch.cat([key_state[i], k[split:]])
        all_v = torch.cat([val_state[i], v[split:]])
        new_key.append(all_k[all_k.size(0) - lc :])
        new_val.append(all_v[all_v.size(0) - lc :])
        all_m = torch.cat([pre_mems, mems])
        new_mem.append(all_m[all_m.size(0) - mem_slots :])

        utterance, right_context = layer._apply_post_attention_ffn(rc_utt_out, utterance, right_context)
        mems = out_mems

    out = enc.layer_norm(enc.output_linear(utterance.permute(1, 0, 2)))  # [B, seg, encoding_dim]
    return out, torch.stack(new_key), torch.stack(new_val), torch.stack(new_mem)
