"""The CPU kernel behind packed W1A1 layers: XNOR-popcount products on bit-packed signs.

For +-1 vectors `a`, `w` of length `K` whose signs are stored as bits (1 for +1, 0 for -1), the dot product is the
integer `a . w = K - 2 * popcount(bits(a) xor bits(w))`. Integer codes `q` in `[q_min, q_max]` (k-bit and unsigned
activations) are taken bit-serially: with the bit planes `c_b` of `q - q_min`,
`q . w = sum_b 2^b (2 popcount(c_b and w) - popcount(c_b)) + q_min (2 popcount(w) - K)`, k AND-popcount products.
A packed `BinaryLinear` with sign activations computes

    y = float(sign(x - tau) . sign(W_j)) * (alpha_j * s) + b_j

so the kernel packs the activations into bits on the fly (`x - tau >= 0`), takes XOR + popcount against the packed
weight rows, and applies the scales and the bias in that order, each operation rounded to float32 on its own (the
extension is compiled without fused multiply-adds): exactly what the reference path computes
(`quantizers.output_scale`), so both agree bit for bit in float32.

The kernel is a C++ extension (`surge_hf/csrc`), compiled on first use with `torch.utils.cpp_extension.load` into
torch's extension cache (`$TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`) and reused afterwards.
The instruction set is chosen at run time: AVX-512 with VPOPCNTDQ, else AVX2 with POPCNT, else portable C++. A
product runs on `torch.get_num_threads()` of torch's OpenMP threads, fewer when it holds less than a minimum of work
per thread (one below it), in one parallel region that packs the inputs and multiplies them block by block, the
threads taking blocks from a shared counter. Where it cannot be built (no C++ compiler, no ninja), packed layers
use the reference path and one warning says why. `SURGE_HF_DISABLE_KERNELS=1` (or true, yes, on) or
`set_enabled(False)` turns the kernel off.

Tracing: the operators (`torch.ops.surge_hf.*`, defined by the extension) get fake kernels when it is built, which
give their outputs' shapes and dtypes without computing them, so `torch.compile` and `torch.export` keep each call as
one node of the graph (an exported program needs `available()` to have registered them before it runs).

Sign outputs: where a layer's float output is only binarized by the next layer, `next(sign(g(y_j) - tau_j))` with an
elementwise activation `g` and the next layer's thresholds tau, the bit of channel `j` is a function of the integer
dot product `d = sign(x - tau') . sign(W_j)` alone, since `y_j = float(d) * (alpha_j * s) + b_j`. `d` takes the
K + 1 values -K, -K + 2, ..., K, so each channel's bit is a table over those values; where the table is 1 on an
interval of `d`, or on the complement of one, it is `(low_j <= d <= low_j + width_j) xor flip_j`, and
`binary_linear_signs` writes these bits, in the activation-bit layout below, instead of floats
(`surge_hf.fusion` builds the tables from the reference path itself, so the bits are the reference path's, exactly).
The next layer takes them with `binary_linear_from_signs`, without packing floats.

Convolutions (`binary_conv2d`, `quantized_conv2d`; groups of 1): each input position's channels are binarized with
their thresholds and packed once, then gathered tap by tap into one bit row per output position (im2col over bits:
row `(n, oh, ow)` holds the words of the input position that tap `(i, j)` reads, each tap's C channels in their own
`ceil(C / 64)` words), and the rows are multiplied by the weight panels of `pack_conv_weight_panels` (the same taps
and words). Zero padding: the reference path's padded taps are 0, neither +1 nor -1. A padded tap's words hold bits 0,
the code `q_min` (-1 for signs), so the product over all taps adds `q_min * w` for each weight `w` that meets the
padding; the output positions that meet the padding alike (a class of output rows by which kernel rows fall inside the
input, times a class of output columns) share one integer correction per output channel,
`-q_min * sum over the padded taps of sum_c w[j][c][tap]`, added to the dot product before it is scaled. The result
is the exact integer sum over the taps inside the input, `float(d) * (alpha_j * s) + b_j` as the reference
`F.conv2d` of the codes (exact below 2^24) followed by the scale and the bias computes it. Outputs are NCHW, or
channels_last for a channels_last input (as `F.conv2d` returns them); NaN where the receptive field holds a NaN.

Attention scores (`sign_scores`): binary attention's `sign(Q) sign(K)^T * scale` per (batch, head) is a sign product
with the head's key rows as the output channels: each query and key row is packed once (the bits of `sign`: 1 where
`x >= 0`, so -0.0 gives +1, and a NaN flags its row), and each score is `float(d - 2 * popcount(q xor k)) * scale`
(the padding bits past head_dim are 0 in both, so they never count), which is what `torch.matmul` of the +-1 floats
(exact integers below 2^24) followed by `* scale` (a Python float, rounded to float32 first) computes, bit for bit.
A query row that holds a NaN gives a row of NaN scores, a key row a column, as in the float product.

Layouts: activation bits are int64 words of shape `(M, ceil(K / 64))`, bit `b` of word `w` holding column `64w + b`
(on a little-endian CPU the bytes are those of `packing.pack_signs`); weight panels are int64 of shape
`(ceil(N / 16), ceil(K / 64), 16)`: 16 weight rows interleaved word by word (`pack_weight_panels`); convolution
panels `(ceil(N / 16), kh * kw * ceil(C / 64), 16)`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import pack_signs, unpack_signs

DISABLE_ENV = "SURGE_HF_DISABLE_KERNELS"
_SOURCES = ("xnor_ops.cpp", "xnor_avx512.cpp", "xnor_avx2.cpp", "xnor_portable.cpp")
_CSRC = Path(__file__).resolve().parent / "csrc"
_state: dict[str, bool | None] = {"loaded": None, "enabled": True}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _ninja_on_path() -> None:
    """Put the `ninja` PyPI package's binary on PATH when no ninja is there (torch's builder calls `ninja`)."""
    if shutil.which("ninja") is not None:
        return
    with contextlib.suppress(ImportError):
        ninja = importlib.import_module("ninja")  # not `import ninja`: custom-code checks would then require it
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _load(openmp: bool) -> None:
    """Compile (or reuse the cached build of) the extension, with `-fopenmp` or without.

    Without it `at::parallel_for` compiles to a plain loop in the extension (ATen's header decides on `_OPENMP`) and
    every product runs on one thread; with it the extension shares torch's OpenMP runtime (`libgomp.so.1`, already
    loaded by torch) and follows `torch.set_num_threads`."""
    from torch.utils.cpp_extension import load

    openmp_flags = ["-fopenmp"] if openmp else []
    load(
        name="surge_hf_xnor",
        sources=[str(_CSRC / source) for source in _SOURCES],
        extra_cflags=["-O3", "-ffp-contract=off", *openmp_flags],
        extra_ldflags=openmp_flags,
        is_python_module=False,
        verbose=False,
    )


def _build() -> bool:
    """Compile (or reuse the cached build of) the extension and register `torch.ops.surge_hf`; False on failure."""
    if not all((_CSRC / source).is_file() for source in _SOURCES):
        warnings.warn(
            f"The C++ sources of surge_hf's CPU kernel are not in {_CSRC} (custom code copied with a checkpoint "
            "ships without them); packed binary layers use the slower reference path (unpack + F.linear). Install "
            "the surge_hf package to get the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    try:
        _ninja_on_path()
        openmp = torch.backends.openmp.is_available() and os.name != "nt"
        try:
            _load(openmp)
        except Exception:  # noqa: BLE001 - a compiler without OpenMP: one thread per product
            if not openmp:
                raise
            _load(openmp=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: use the reference path
        warnings.warn(
            f"surge_hf could not build its CPU kernel ({type(error).__name__}: {str(error).strip()[:300]}); packed "
            "binary layers use the slower reference path (unpack + F.linear). Install a C++ compiler and the "
            "`ninja` package to get the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _register_fakes()
    return True


def _disabled_by_environment() -> bool:
    """Whether `SURGE_HF_DISABLE_KERNELS` turns the kernel off: 1/true/yes/on do, unset, empty or 0/false/no/off do
    not (any case); any other value is an error rather than a guess."""
    value = os.environ.get(DISABLE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{DISABLE_ENV}={os.environ[DISABLE_ENV]!r} is not a boolean: set it to 1 (or true, yes, on) to "
                     "turn surge_hf's CPU kernel off, or to 0 (or false, no, off), or unset it, to keep it on.")


def available() -> bool:
    """Whether the kernel is enabled and built (building it on the first call)."""
    if not _state["enabled"] or _disabled_by_environment():
        return False
    if _state["loaded"] is None:
        _state["loaded"] = _build()
    return bool(_state["loaded"])


def set_enabled(enabled: bool) -> None:
    """Turn the kernel on or off for this process (off: packed layers use the reference path)."""
    _state["enabled"] = bool(enabled)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run a block with the kernel turned off."""
    previous = _state["enabled"]
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def _ops():
    if not available():
        raise RuntimeError(f"The surge_hf CPU kernel is not available (disabled, or it could not be built; "
                           f"unset {DISABLE_ENV} and see the warning raised on first use).")
    return torch.ops.surge_hf


def isa() -> str:
    """The instruction set the kernel runs with: `avx512_vpopcntdq`, `avx2` or `portable`."""
    return _ops().xnor_isa()


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run, fastest first."""
    return list(_ops().xnor_supported_isas())


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run a block with the kernel forced to instruction set `name` (one of `supported_isas()`)."""
    previous = _ops().xnor_set_isa(name)
    try:
        yield
    finally:
        _ops().xnor_set_isa(previous)


def pack_weight_panels(weight_packed: Tensor, in_features: int) -> Tensor:
    """Weight panels (see the module docstring) from `packing.pack_signs` rows `(N, ceil(K / 8))` uint8."""
    return _ops().pack_weight_panels(weight_packed, in_features)


def pack_activation_bits(x: Tensor, threshold: Tensor | None = None) -> Tensor:
    """The sign bits of `x - threshold` (`x` float32 `(M, K)`): int64 `(M, ceil(K / 64))`, 1 where `x - tau >= 0`."""
    return _ops().pack_activation_bits(x.contiguous(), None if threshold is None else threshold.contiguous())


def weight_row_counts(weight_packed: Tensor) -> Tensor:
    """The number of +1 signs of each packed weight row, int32 `(N,)` (needed by the code products)."""
    return _ops().weight_row_counts(weight_packed)


def pack_activation_codes(x: Tensor, threshold: Tensor | None, step: float, q_min: int, q_max: int
                          ) -> tuple[Tensor, Tensor]:
    """The bit planes of `c = q - q_min`, `q = clamp(round((x - tau) / step), q_min, q_max)` (`x` float32 `(M, K)`):
    int64 `(M * k, ceil(K / 64))` with plane `b` of row `m` at row `m * k + b`, and each plane's popcount (int32)."""
    return _ops().pack_activation_codes(x.contiguous(), _operand(threshold), step, q_min, q_max)


def xnor_gemm(activation_bits: Tensor, weight_panels: Tensor, out_features: int, in_features: int) -> Tensor:
    """The exact +-1 dot products `K - 2 * popcount(a xor w)`, int32 of shape `(M, N)`."""
    return _ops().xnor_gemm(activation_bits, weight_panels, out_features, in_features)


def code_gemm(planes: Tensor, plane_counts: Tensor, weight_panels: Tensor, weight_counts: Tensor, out_features: int,
              in_features: int, q_min: int, q_max: int) -> Tensor:
    """The exact products `q . sign(W_j)` of integer codes with sign weights, bit-serial (module docstring), int32
    of shape `(M, N)`."""
    return _ops().code_gemm(planes, plane_counts, weight_panels, weight_counts, out_features, in_features, q_min,
                            q_max)


def binary_linear(x: Tensor, threshold: Tensor | None, weight_panels: Tensor, out_features: int, alpha: Tensor,
                  input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """`float(sign(x - tau) . sign(W_j)) * (alpha_j * s) + b_j` for float32 `x` of shape `(..., K)` (see the module
    docstring); tau, s and b optional. Returns float32 of shape `(..., N)`.

    Differentiable like the reference path: no gradient reaches `x` or tau (the sign comparison cuts the graph),
    s gets `sum(g * float(dots) * alpha)` and b gets `sum(g)`."""
    return _scaled_sign_product(x, threshold, weight_panels, out_features, alpha, input_scale, bias, None)


def _scaled_sign_product(x: Tensor, threshold: Tensor | None, panels: Tensor, out_features: int, alpha: Tensor,
                         input_scale: Tensor | None, bias: Tensor | None, geometry: ConvGeometry | None) -> Tensor:
    """`binary_linear` (geometry None) or `binary_conv2d`, through `_ScaledSignProduct` where s or b needs a
    gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input_scale, bias)):
        return _ScaledSignProduct.apply(x, threshold, panels, out_features, alpha, input_scale, bias, geometry)
    return _sign_product(x, threshold, panels, out_features, alpha, input_scale, bias, geometry)


def _sign_product(x: Tensor, threshold: Tensor | None, panels: Tensor, out_features: int, alpha: Tensor,
                  input_scale: Tensor | None, bias: Tensor | None, geometry: ConvGeometry | None) -> Tensor:
    if geometry is None:
        return _binary_linear(x, threshold, panels, out_features, alpha, input_scale, bias)
    return _binary_conv2d(x, threshold, panels, out_features, geometry, alpha, input_scale, bias)


class _ScaledSignProduct(torch.autograd.Function):
    """The gradients of a sign product's input scale s and bias b (see `binary_linear`); b is broadcast along every
    dim but the channels (the last for a linear layer, the third from the end for a convolution)."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor | None, panels: Tensor, out_features: int, alpha: Tensor,
                scale: Tensor | None, bias: Tensor | None, geometry: ConvGeometry | None) -> Tensor:
        ctx.save_for_backward(x, threshold, panels, alpha)
        ctx.out_features, ctx.geometry = out_features, geometry
        return _sign_product(x, threshold, panels, out_features, alpha, scale, bias, geometry)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, threshold, panels, alpha = ctx.saved_tensors
        grad_scale = grad_bias = None
        if ctx.needs_input_grad[5]:
            unscaled = _sign_product(x, threshold, panels, ctx.out_features, alpha, None, None, ctx.geometry)
            grad_scale = (grad_output * unscaled).sum().reshape(1)
        if ctx.needs_input_grad[6]:
            if ctx.geometry is None:
                grad_bias = grad_output.reshape(-1, ctx.out_features).sum(0)
            else:  # channels are the third dim from the end
                grad_bias = grad_output.sum([dim for dim in range(grad_output.dim()) if dim != grad_output.dim() - 3])
        return None, None, None, None, None, grad_scale, grad_bias, None


def _binary_linear(x: Tensor, threshold: Tensor | None, weight_panels: Tensor, out_features: int, alpha: Tensor,
                   input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    rows = _rows(x)
    out = _ops().binary_linear(
        rows, _operand(threshold), weight_panels, out_features, _operand(alpha), _operand(input_scale),
        _operand(bias),
    )
    return out.reshape(*x.shape[:-1], out_features)


@dataclass(frozen=True)
class PackedSigns:
    """The sign bits of a layer output that the next layer only binarizes (see the module docstring), standing in
    for the float tensor of shape `shape`: `bits` int64 `(prod(shape[:-1]), ceil(shape[-1] / 64))`, and `nan_rows`
    uint8, 1 for the rows whose float output would be NaN (the next layer's output row is NaN there)."""

    bits: Tensor
    nan_rows: Tensor
    shape: torch.Size


def binary_linear_signs(x: Tensor, threshold: Tensor | None, weight_panels: Tensor, out_features: int, low: Tensor,
                        width: Tensor, flip: Tensor) -> PackedSigns:
    """The bits `(low_j <= d_j <= low_j + width_j) xor flip_j` of the dot products `d = sign(x - tau) . sign(W_j)`
    of float32 `x` of shape `(..., K)` (int32 `low`, `width`, uint8 `flip`, one per output channel)."""
    rows = _rows(x)
    bits, nan_rows = _ops().binary_linear_signs(rows, _operand(threshold), weight_panels, out_features, low, width,
                                                flip)
    return PackedSigns(bits, nan_rows, torch.Size((*x.shape[:-1], out_features)))


def binary_linear_from_signs(signs: PackedSigns, weight_panels: Tensor, out_features: int, alpha: Tensor,
                             input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """`binary_linear` of the input that `signs` stands for, from its bits (inference only: no gradient)."""
    out = _ops().binary_linear_from_signs(signs.bits, signs.nan_rows, weight_panels, out_features, signs.shape[-1],
                                          _operand(alpha), _operand(input_scale), _operand(bias))
    return out.reshape(*signs.shape[:-1], out_features)


def quantized_linear(x: Tensor, threshold: Tensor | None, step: Tensor, levels: tuple[int, int], weight_panels: Tensor,
                     weight_counts: Tensor, out_features: int, alpha: Tensor, bias: Tensor | None) -> Tensor:
    """`float(q . sign(W_j)) * (alpha_j * s) + b_j` with the codes `q = clamp(round((x - tau) / s), q_min, q_max)`
    (`levels = (q_min, q_max)`, 2, 4, 16 or 256 levels) of float32 `x` of shape `(..., K)`, bit-serial. Returns
    float32 of shape `(..., N)`. Inference only (no gradient)."""
    rows = _rows(x)
    out = _ops().quantized_linear(rows, _operand(threshold), _operand(step), levels[0], levels[1],
                                  weight_panels, weight_counts, out_features, _operand(alpha), _operand(bias))
    return out.reshape(*x.shape[:-1], out_features)


def sign_scores(query: Tensor, key: Tensor, scale: float) -> Tensor:
    """`float(sign(Q) sign(K)^T) * scale` per (batch, head) for float32 `query` `(B, H, Tq, d)` and `key`
    `(B, H, Tk, d)` (any strides; a head_dim that is not adjacent in memory is copied), with `sign(x) = +1` where
    `x >= 0`, else -1: float32 `(B, H, Tq, Tk)`, NaN in the rows (columns) of queries (keys) that hold a NaN (module
    docstring). Equal to `torch.matmul(sign(Q), sign(K).transpose(2, 3)) * scale` bit for bit. No gradient."""
    return _ops().sign_scores(query.detach(), key.detach(), float(scale))


class ConvGeometry(NamedTuple):
    """The geometry of a 2-D convolution: `kernel_size`, `stride` and `dilation` as (height, width), the zero
    `padding` as (top, bottom, left, right)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]

    @classmethod
    def of(cls, kernel_size: int | tuple[int, ...], stride: int | tuple[int, ...] = 1,
           padding: int | tuple[int, ...] | str = 0, dilation: int | tuple[int, ...] = 1) -> ConvGeometry:
        """From `nn.Conv2d`'s arguments: ints or pairs; padding an int, a pair (symmetric), 4 values, "valid" (none) or
        "same" (stride 1; where the padding is odd, the extra row or column goes to the bottom or right, as in
        `F.conv2d`)."""
        kernel_size, stride, dilation = (_pair(value, name) for value, name in
                                         ((kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation")))
        if padding == "valid":
            padding = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}.")
            totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            padding = (totals[0] // 2, totals[0] - totals[0] // 2, totals[1] // 2, totals[1] - totals[1] // 2)
        elif isinstance(padding, str):
            raise ValueError(f"padding must be an int, 2 or 4 ints, 'valid' or 'same', got {padding!r}.")
        elif isinstance(padding, int) or len(padding) == 2:
            height, width = _pair(padding, "padding")
            padding = (height, height, width, width)
        elif len(padding) != 4:
            raise ValueError(f"padding must be an int, 2 or 4 ints, 'valid' or 'same', got {padding!r}.")
        return cls(kernel_size, stride, tuple(int(p) for p in padding), dilation)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output's (height, width) for an input of (height, width) (as `F.conv2d`'s)."""
        (kh, kw), (sh, sw), (top, bottom, left, right), (dh, dw) = self
        return ((height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (width + left + right - dw * (kw - 1) - 1) // sw + 1)


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or 2 ints (height, width), got {value!r}.")
    return int(pair[0]), int(pair[1])


def pack_conv_weight_panels(weight_packed: Tensor, weight_shape: tuple[int, int, int, int]) -> Tensor:
    """The weight panels of a convolution (see the module docstring) from its `packing.pack_signs` rows
    `(N, ceil(C * kh * kw / 8))` uint8 and its shape `(N, C, kh, kw)`: int64 `(ceil(N / 16), kh * kw * ceil(C / 64),
    16)`, tap `(i, j)` (row-major over the kernel) in words `[(i * kw + j) * ceil(C / 64), ...)`, channel `c` at bit
    `c % 64` of its tap's word `c // 64`, bits past C zero."""
    if len(weight_shape) != 4:
        raise ValueError(f"weight_shape must be (out_channels, in_channels, kh, kw), got {tuple(weight_shape)}.")
    out_channels, channels, kh, kw = weight_shape
    signs = unpack_signs(weight_packed, weight_shape).permute(0, 2, 3, 1)  # (N, kh, kw, C): taps, then channels
    words = (channels + 63) // 64
    signs = F.pad(signs, (0, words * 64 - channels), value=-1.0)  # channels past C: bit 0
    columns = kh * kw * words * 64
    return pack_weight_panels(pack_signs(signs.reshape(out_channels, columns)), columns)


def binary_conv2d(x: Tensor, threshold: Tensor | None, weight_panels: Tensor, out_channels: int,
                  geometry: ConvGeometry, alpha: Tensor, input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    """`float(d_j) * (alpha_j * s) + b_j` with `d = conv2d(sign(x - tau), sign(W))[:, j]` the exact integer sum over
    the taps inside the input (padded taps count 0: module docstring), for float32 `x` of shape `(B, C, H, W)`, tau
    of shape `(C,)` (optional), the panels of `pack_conv_weight_panels`, groups 1; s and b optional. Returns float32
    of shape `(B, N, OH, OW)`, as `F.conv2d` sizes it.

    Differentiable like `binary_linear`: s and b get their gradients, `x` and tau none."""
    return _scaled_sign_product(x, threshold, weight_panels, out_channels, alpha, input_scale, bias, geometry)


def _binary_conv2d(x: Tensor, threshold: Tensor | None, weight_panels: Tensor, out_channels: int,
                   geometry: ConvGeometry, alpha: Tensor, input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return _ops().binary_conv2d(_images(x), _operand(threshold), weight_panels, out_channels, *geometry,
                                _operand(alpha), _operand(input_scale), _operand(bias))


def quantized_conv2d(x: Tensor, threshold: Tensor | None, step: Tensor, levels: tuple[int, int], weight_panels: Tensor,
                     weight_counts: Tensor, out_channels: int, geometry: ConvGeometry, alpha: Tensor,
                     bias: Tensor | None) -> Tensor:
    """`binary_conv2d` of the codes `q = clamp(round((x - tau) / s), q_min, q_max)` (`levels = (q_min, q_max)`, 2,
    4, 16 or 256 levels): `float(d_j) * (alpha_j * s) + b_j` with `d = conv2d(q, sign(W))[:, j]`, padded taps 0,
    bit-serial (`weight_counts`: `weight_row_counts` of the packed weight). Inference only (no gradient)."""
    return _ops().quantized_conv2d(_images(x), _operand(threshold), _operand(step), levels[0], levels[1],
                                   weight_panels, weight_counts, out_channels, *geometry, _operand(alpha),
                                   _operand(bias))


def _images(x: Tensor) -> Tensor:
    """`x` (detached), checked to be a batch of images `(B, C, H, W)`."""
    if x.dim() != 4:
        raise ValueError(f"A binary convolution takes a batch of images (batch, channels, height, width), got shape "
                         f"{tuple(x.shape)}; add the batch dim of a single image with x.unsqueeze(0).")
    return x.detach() if x.requires_grad else x


def _operand(tensor: Tensor | None) -> Tensor | None:
    """`tensor` as the operators take it, detached and contiguous: the tensor itself when it already is both (the
    packed layers' scales, thresholds and biases at inference), so that a forward pass dispatches no copy or alias
    per layer for them."""
    if tensor is None:
        return None
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _rows(x: Tensor) -> Tensor:
    """`x` of shape `(..., K)` as contiguous rows `(M, K)`, detached (`_operand`)."""
    return _operand((x.detach() if x.requires_grad else x).reshape(-1, x.shape[-1]))


# -- fake kernels: the operators' output shapes and dtypes, for tracing (torch.compile, torch.export) ----------------
def _words(columns: int) -> int:
    return (columns + 63) // 64


def _code_planes(q_min: int, q_max: int) -> int:
    return {2: 1, 4: 2, 16: 4, 256: 8}[q_max - q_min + 1]


def _fake_pack_weight_panels(packed: Tensor, k: int) -> Tensor:
    return packed.new_empty(((packed.shape[0] + 15) // 16, _words(k), 16), dtype=torch.int64)


def _fake_pack_activation_bits(x: Tensor, threshold: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], _words(x.shape[1])), dtype=torch.int64)


def _fake_weight_row_counts(packed: Tensor) -> Tensor:
    return packed.new_empty((packed.shape[0],), dtype=torch.int32)


def _fake_pack_activation_codes(x: Tensor, threshold: Tensor | None, step: float, q_min: int, q_max: int
                                ) -> tuple[Tensor, Tensor]:
    rows = x.shape[0] * _code_planes(q_min, q_max)
    return x.new_empty((rows, _words(x.shape[1])), dtype=torch.int64), x.new_empty((rows,), dtype=torch.int32)


def _fake_xnor_gemm(bits: Tensor, panels: Tensor, n: int, k: int) -> Tensor:
    return bits.new_empty((bits.shape[0], n), dtype=torch.int32)


def _fake_code_gemm(planes: Tensor, plane_counts: Tensor, panels: Tensor, weight_counts: Tensor, n: int, k: int,
                    q_min: int, q_max: int) -> Tensor:
    return planes.new_empty((planes.shape[0] // _code_planes(q_min, q_max), n), dtype=torch.int32)


def _fake_binary_linear(x: Tensor, threshold: Tensor | None, panels: Tensor, n: int, alpha: Tensor,
                        input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _fake_binary_linear_from_signs(bits: Tensor, nan_rows: Tensor, panels: Tensor, n: int, k: int, alpha: Tensor,
                                   input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return bits.new_empty((bits.shape[0], n), dtype=torch.float32)


def _fake_binary_linear_signs(x: Tensor, threshold: Tensor | None, panels: Tensor, n: int, low: Tensor, width: Tensor,
                              flip: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty((x.shape[0], _words(n)), dtype=torch.int64), x.new_empty((x.shape[0],), dtype=torch.uint8)


def _fake_quantized_linear(x: Tensor, threshold: Tensor | None, step: Tensor, q_min: int, q_max: int, panels: Tensor,
                           weight_counts: Tensor, n: int, alpha: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((x.shape[0], n), dtype=torch.float32)


def _fake_conv_output(x: Tensor, n: int, kernel_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int]) -> Tensor:
    height, width = ConvGeometry(tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)).output_size(
        x.shape[2], x.shape[3])
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((x.shape[0], n, height, width), dtype=torch.float32, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _fake_binary_conv2d(x: Tensor, threshold: Tensor | None, panels: Tensor, n: int, kernel_size: list[int],
                        stride: list[int], padding: list[int], dilation: list[int], alpha: Tensor,
                        input_scale: Tensor | None, bias: Tensor | None) -> Tensor:
    return _fake_conv_output(x, n, kernel_size, stride, padding, dilation)


def _fake_quantized_conv2d(x: Tensor, threshold: Tensor | None, step: Tensor, q_min: int, q_max: int, panels: Tensor,
                           weight_counts: Tensor, n: int, kernel_size: list[int], stride: list[int],
                           padding: list[int], dilation: list[int], alpha: Tensor, bias: Tensor | None) -> Tensor:
    return _fake_conv_output(x, n, kernel_size, stride, padding, dilation)


def _fake_sign_scores(query: Tensor, key: Tensor, scale: float) -> Tensor:
    return query.new_empty((*query.shape[:3], key.shape[2]), dtype=torch.float32)


_FAKES = {
    "pack_weight_panels": _fake_pack_weight_panels,
    "pack_activation_bits": _fake_pack_activation_bits,
    "weight_row_counts": _fake_weight_row_counts,
    "pack_activation_codes": _fake_pack_activation_codes,
    "xnor_gemm": _fake_xnor_gemm,
    "code_gemm": _fake_code_gemm,
    "binary_linear": _fake_binary_linear,
    "binary_linear_from_signs": _fake_binary_linear_from_signs,
    "binary_linear_signs": _fake_binary_linear_signs,
    "quantized_linear": _fake_quantized_linear,
    "binary_conv2d": _fake_binary_conv2d,
    "quantized_conv2d": _fake_quantized_conv2d,
    "sign_scores": _fake_sign_scores,
}


def _register_fakes() -> None:
    """Give every tensor operator of the built extension its fake kernel (`torch.library.register_fake`): tracing
    runs it on FakeTensors to learn the output's shape and dtype, so `torch.compile` and `torch.export` keep the
    operator as one node of the graph. The extension names this module as the home of its fakes
    (`set_python_module`)."""
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"surge_hf::{name}", fake)
