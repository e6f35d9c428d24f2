"""A Triton kernel of `wattn::WindowAttention3D`: flash attention inside each window (the plugin's implementation).

Same contract as the op in `op.py` (docs/window_attention_op.md §1): q, k, v `[N, T, H, W, d]` contiguous, N = batch x
heads batch-major, windows `(wt, wh, ww)` (-1 = full extent), optional relative-position bias `[heads, L, L]`.
One program handles BLOCK_M queries of one window and streams that window's keys in BLOCK_N blocks with an online
softmax (running max and sum, float32 accumulators), so no L x L matrix is ever stored. The window partition is
index arithmetic: token l of window w sits at (it*wt + l // (wh*ww), ih*wh + l // ww % wh, iw*ww + l % ww).

Two entry points share the body: `window_attention_triton` launches it from torch (the JIT plugin, tests), and
`compile_aot` compiles it to PTX in TensorRT's ahead-of-time plugin argument order (inputs, int32 extras,
outputs), with the scale compiled in. Runs on a GPU, or on the CPU under `TRITON_INTERPRET=1` (set before this
module is imported), which the tests use; PTX compiles on a CPU too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from walt_export.window_attention.op import check_inputs


@triton.jit
def _token_offsets(offs, n, it, ih, iw, T, H, W, D, WT, WH, WW):
    """Window-local token indices of window (it, ih, iw) of sample n -> element offsets of their feature 0."""
    t = it * WT + offs // (WH * WW)
    h = ih * WH + (offs // WW) % WH
    x = iw * WW + offs % WW
    return (((n * T + t) * H + h) * W + x) * D


@triton.jit
def _attend(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, scale,
    T, H, W, D, heads, WT, WH, WW, NH, NW, L,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The body of both entry points: BLOCK_M queries of one window against all its keys."""
    window = tl.program_id(0)  # over N * num_windows
    n_win = (T // WT) * NH * NW
    n = window // n_win
    w = window % n_win
    it, ih, iw = w // (NH * NW), (w // NW) % NH, w % NW

    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # query tokens of the window
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    q_off = _token_offsets(offs_m, n, it, ih, iw, T, H, W, D, WT, WH, WW)
    mask_m = offs_m < L
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q = (q * scale).to(q.dtype)  # scale on q before q k^T (the contract's order)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, L, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        kv_off = _token_offsets(offs_n, n, it, ih, iw, T, H, W, D, WT, WH, WW)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N) float32
        if HAS_BIAS:
            head = n % heads
            b_ptrs = bias_ptr + (head * L + offs_m[:, None]) * L + offs_n[None, :]
            s += tl.load(b_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + q_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _window_attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, scale,
    T, H, W, D, heads,  # grid sizes and head dim
    WT, WH, WW, NH, NW, L,  # window, windows per axis (H, W), window volume
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _attend(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, scale, T, H, W, D, heads, WT, WH, WW, NH, NW, L,
            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _window_attention_aot_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr,  # TensorRT's ahead-of-time plugin launch order: inputs,
    T, H, W, D, heads, WT, WH, WW, NH, NW, L,  # then the extra int32 arguments,
    out_ptr,  # then outputs
    SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    _attend(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, SCALE, T, H, W, D, heads, WT, WH, WW, NH, NW, L,
            HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_D)


AOT_INT_ARGS = ("T", "H", "W", "D", "heads", "WT", "WH", "WW", "NH", "NW", "L")  # the extra args, in order


@dataclass(frozen=True)
class AotKernel:
    """A kernel compiled ahead of time to PTX, with what a launcher needs."""

    name: str
    ptx: str
    num_warps: int
    shared_bytes: int
    block_m: int


def blocks(length: int, head_dim: int, block_m: int = 64, block_n: int = 64) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for a window volume and head dim: at most 64, at least 16, powers of two."""
    return (min(block_m, max(16, triton.next_power_of_2(length))), min(block_n, max(16, triton.next_power_of_2(length))),
            max(16, triton.next_power_of_2(head_dim)))


def compile_aot(dtype: str, scale: float, head_dim: int, length: int | None, has_bias: bool = True,
                compute_capability: int | None = None) -> AotKernel:
    """PTX of the ahead-of-time entry point for float16/float32 tensors (the TensorRT plugin's `aot_impl`).

    `scale` is compiled in (TensorRT passes only int32 extra arguments); `length`, the window volume, sizes the
    blocks (None: unknown at build time, the largest blocks). `compute_capability` (e.g. 90, 87 for Orin): default
    the current GPU's. Compiling needs no GPU when it is given, only Triton's bundled LLVM and ptxas, but not
    `TRITON_INTERPRET=1` (interpreted kernels cannot be compiled).

    Triton 3.x appends two pointer parameters (global and profile scratch, unused: their sizes are 0) after the
    kernel's own; TensorRT's launcher passes only inputs, extras and outputs. Unverified on a GPU (see the plugin).
    """
    from triton.backends.compiler import GPUTarget

    if dtype not in ("fp16", "fp32"):
        raise ValueError(f"dtype must be fp16 or fp32, got {dtype!r}")
    block_m, block_n, block_d = blocks(length or 64, head_dim)
    pointer = f"*{dtype}"
    signature = {name: pointer for name in ("q_ptr", "k_ptr", "v_ptr", "bias_ptr")}
    signature |= {name: "i32" for name in AOT_INT_ARGS} | {"out_ptr": pointer}
    constants = {"SCALE": float(scale), "HAS_BIAS": has_bias, "BLOCK_M": block_m, "BLOCK_N": block_n,
                 "BLOCK_D": block_d}
    signature |= {name: "constexpr" for name in constants}
    source = triton.compiler.ASTSource(fn=_window_attention_aot_kernel, signature=signature, constexprs=constants)
    target = (GPUTarget("cuda", compute_capability, 32) if compute_capability is not None
              else triton.runtime.driver.active.get_current_target())
    compiled = triton.compile(source, target=target)
    return AotKernel(compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps,
                     compiled.metadata.shared, block_m)


def window_attention_triton(q: Tensor, k: Tensor, v: Tensor, window, scale: float, bias: Tensor | None = None,
                            out: Tensor | None = None, block_m: int = 64, block_n: int = 64) -> Tensor:
    """The op through the Triton kernel; float16 or float32 `[N, T, H, W, d]` tensors (made contiguous).
    `out`: a contiguous buffer of q's shape and dtype to write into (a TensorRT plugin's output)."""
    wt, wh, ww = check_inputs(q, k, v, bias, window)
    q, k, v = (x.contiguous() for x in (q, k, v))
    n, t, h, w, d = q.shape
    length = wt * wh * ww
    block_m, block_n, block_d = blocks(length, d, block_m, block_n)
    out = torch.empty_like(q) if out is None else out
    heads = bias.shape[0] if bias is not None else 1
    bias_arg = bias.to(q.dtype).contiguous() if bias is not None else q  # unused without HAS_BIAS
    grid = (n * (t // wt) * (h // wh) * (w // ww), triton.cdiv(length, block_m))
    _window_attention_kernel[grid](
        q, k, v, bias_arg, out, float(scale), t, h, w, d, heads, wt, wh, ww, h // wh, w // ww, length,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out
