"""Payloads on the wire in fewer bits: ``federation.wire_dtype`` (fp32, bf16, fp16, int8) for what the server
sends and what the clients send back.

A state (:data:`~fedlora.adapters.state.AdapterState`, CPU float32) is encoded into tensors of the wire dtype
and decoded back into float32 on arrival. The wire form describes itself (the key says how each tensor was
coded), so a receiver needs no setting to decode it, and it crosses every transport unchanged: safetensors
bytes between worker processes, a Flower ``ArrayRecord`` (numpy dtypes only, hence bf16 as its 16-bit pattern).

Which tensors: float tensors of two or more dimensions and at least :data:`MIN_CODED_ELEMENTS` entries (LoRA
factors, a full update, a classifier head's weight). Vectors and scalars (biases, norms, FedKSeed's scalar
gradients, seeds) travel as they are: their bytes are a negligible share and their values are often exact
quantities; so do small matrices (Fed-SB's r x r latents at a small r), where the coded key and its scales
would cost more header bytes than the coding saves.

Rules, for a tensor ``x`` viewed as 2-D (its first dimension by the rest):

- ``bf16`` / ``fp16``: ``x`` rounded to that dtype (round to nearest even); ``bf16`` keeps float32's range
  with 8 bits of mantissa, ``fp16`` 11 bits within +-65504 (larger values become inf and the reply is then
  rejected as non-finite by the update screens).
- ``int8``, symmetric with one scale per row of the shorter side (a LoRA ``B`` of d x r gets r scales, one per
  rank component; ``A`` of r x k gets r): for each row ``x_i``, ``s_i = max_j |x_ij| / 127`` and
  ``q_ij = round(x_ij / s_i)`` in [-127, 127]; decoded ``x^_ij = s_i q_ij`` (an all-zero row has ``s_i = 0``).
  The error is at most ``s_i / 2`` per entry. Bytes: one per entry plus four per scale.

Uploads carry the update, not the state: for each coded tensor the client was also sent (same key, same
shape), the reply holds ``Delta = x_client - x_start`` coded (key ``<name>::delta``), where ``x_start`` is the
payload as it arrived (decoded, so the server knows it exactly), and the server restores ``x_start + Delta^``
(:func:`restore_updates`). An update is far smaller than the state it changes, so its int8 / bf16 rounding
error is too. Tensors the client was not sent in that shape (a personal factor, FedProto's prototypes) travel
as values.

Error feedback (``federation.wire_error_feedback``, EF-SGD's rule, Karimireddy et al. 2019): the client keeps
what rounding took from its last upload, ``e``, adds it to the next one, ``Delta' = Delta + e``, sends
``C(Delta')`` and keeps ``e <- Delta' - C(Delta')``; the server's sum of updates then loses no mass over the
rounds, only delays it. ``e`` lives in the client's personal store (never sent).

Encoding is deterministic and done once per crossing (the engine encodes, the transport carries, the receiver
decodes), so every transport gives the same values bit for bit.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedlora.adapters.state import AdapterState

WireDtype = Literal["fp32", "bf16", "fp16", "int8"]
WIRE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8")

#: key suffixes of the coded tensors (PEFT keys never contain "::")
BF16_BITS = "::bf16"  # int16 tensor holding bf16 bit patterns (numpy has no bfloat16)
INT8_VALUES = "::int8"  # int8 values q
INT8_SCALES = "::int8-scale"  # float32 scales s, one per row of the shorter side
INT8_TRANSPOSED = "::int8-t"  # the same, for a tensor whose rows are its last dimension(s)
UPDATE = "::delta"  # an upload's x_client - x_start (restore_updates adds x_start back)


#: the fewest entries a matrix needs to travel coded (below, the header bytes of a coded entry outweigh it)
MIN_CODED_ELEMENTS = 256


def coded(value: torch.Tensor) -> bool:
    """Whether ``value`` travels in the wire dtype (a float matrix of :data:`MIN_CODED_ELEMENTS` or more)."""
    return value.is_floating_point() and value.dim() >= 2 and value.numel() >= MIN_CODED_ELEMENTS


def quantize_int8(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)`` for a 2-D float ``matrix``: ``s_i = max_j |m_ij| / 127`` per row, ``q = round(m / s)`` as int8."""
    scales = matrix.abs().amax(dim=1) / 127.0
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(matrix / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return values, scales


def encode_state(state: AdapterState, dtype: str) -> AdapterState:
    """``state`` as it crosses the wire in ``dtype`` (the same dict for fp32)."""
    if dtype == "fp32":
        return state
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    out: AdapterState = {}
    for key, value in state.items():
        if not coded(value):
            out[key] = value
        elif dtype == "fp16":
            out[key] = value.to(torch.float16)
        elif dtype == "bf16":
            out[key + BF16_BITS] = value.to(torch.bfloat16).view(torch.int16)
        else:
            matrix = value.reshape(value.shape[0], -1).float()
            transposed = matrix.shape[0] > matrix.shape[1]  # scales along the shorter side
            values, scales = quantize_int8(matrix.T if transposed else matrix)
            suffix = INT8_TRANSPOSED if transposed else INT8_VALUES
            out[key + suffix] = (values.T if transposed else values).reshape(value.shape).contiguous()
            out[key + INT8_SCALES] = scales
    return out


def decode_state(wire: AdapterState) -> AdapterState:
    """The float32 state a wire form carries (:func:`encode_state` undone; a float32 state as it is)."""
    if not any("::" in key or value.dtype == torch.float16 for key, value in wire.items()):
        return wire
    out: AdapterState = {}
    for key, value in wire.items():
        if key.endswith(INT8_SCALES):
            continue
        if key.endswith(BF16_BITS):
            out[key.removesuffix(BF16_BITS)] = value.view(torch.bfloat16).float()
        elif key.endswith((INT8_VALUES, INT8_TRANSPOSED)):
            transposed = key.endswith(INT8_TRANSPOSED)
            name = key.removesuffix(INT8_TRANSPOSED if transposed else INT8_VALUES)
            scales = wire[name + INT8_SCALES]
            matrix = value.reshape(value.shape[0], -1).float()
            matrix = matrix * (scales[None, :] if transposed else scales[:, None])
            out[name] = matrix.reshape(value.shape)
        elif value.dtype == torch.float16:
            out[key] = value.float()
        else:
            out[key] = value
    return out


def encode_reply(
    state: AdapterState,
    start: AdapterState,
    dtype: str,
    residual: AdapterState | None = None,
) -> tuple[AdapterState, AdapterState]:
    """A client's reply in its wire form and the error it leaves: each coded tensor that ``start`` (the payload
    as it arrived) holds in the same shape travels as its update ``state - start`` (+ ``residual``, the last
    upload's error, with error feedback) under ``<key>::delta``; the rest as :func:`encode_state` codes it.
    Returns ``(wire, error)``: ``error`` is ``update - decoded update`` per such key (the next residual)."""
    if dtype == "fp32":
        return state, {}
    values: AdapterState = {}
    for key, value in state.items():
        base = start.get(key)
        if coded(value) and base is not None and base.shape == value.shape:
            update = value - base
            if residual is not None and key in residual:
                update = update + residual[key]
            values[key + UPDATE] = update
        else:
            values[key] = value
    wire = encode_state(values, dtype)
    sent = decode_state(wire)
    error = {key.removesuffix(UPDATE): values[key] - sent[key] for key in values if key.endswith(UPDATE)}
    return wire, error


def restore_updates(decoded: AdapterState, start: AdapterState) -> AdapterState:
    """A decoded reply with every ``<key>::delta`` turned back into the state ``start[key] + update``."""
    if not any(key.endswith(UPDATE) for key in decoded):
        return decoded
    out: AdapterState = {}
    for key, value in decoded.items():
        if key.endswith(UPDATE):
            name = key.removesuffix(UPDATE)
            out[name] = start[name] + value
        else:
            out[key] = value
    return out
