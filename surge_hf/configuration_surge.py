"""`SurgeConfig`: the binarization recipe, validated in one place and serialisable to plain JSON.

The recipe says which layers become binary, how weights and activations are binarized, which surrogate gradient
replaces the derivative of `sign`, and how the SURGE Dual-Path Gradient Compensator (DPGC) and Adaptive Gradient
Scaler (AGS) behave, including the choices the method leaves open (see the field docs below).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

SURGE_CONFIG_VERSION = 1

COMPENSATORS = ("surge", "fixed", "ste")
SURROGATES = ("clipped_ste", "identity", "approx_sign", "swish_sign")
ACTIVATION_BINARIZERS = ("sign", "rsign", "elastic")
WEIGHT_SCALES = ("channel", "tensor", "none")
AUX_WEIGHTS = ("separate", "shared", "frozen")
LAMBDA_PLACEMENTS = ("fork", "previous")
MODULE_PATTERN_FIELDS = ("target_modules", "exclude_modules", "unsigned_activation_modules")
ACTIVATION_BITS = (1, 2, 4, 8)
WEIGHT_PLANES = (1, 2)

# Per-architecture default targets: regular expressions matched (re.fullmatch) against module names.
# Every Linear inside a transformer block (attention projections and FFN, whatever their names in a
# transformers version); embeddings, pooler, patch embedding and classifier stay full precision.
DEFAULT_TARGET_MODULES: dict[str, str] = {
    "bert": r"(.*\.)?encoder\.layers?\.\d+\..*",
    "vit": r"(.*\.)?(encoder\.)?layers?\.\d+\..*",
    # The convolutions of every residual block; the stem, the 1x1 downsampling shortcuts and the classifier stay in
    # full precision, as in Bi-Real Net and ReActNet.
    "resnet": r"(.*\.)?encoder\.stages\.\d+\.layers\.\d+\.layer\.\d+\.convolution",
}
# SURGE model types resolve to the defaults of the architecture they wrap.
MODEL_TYPE_ALIASES = {"surge_bert": "bert", "surge_vit": "vit"}

_Function = TypeVar("_Function", bound=Callable[..., Any])


def renamed_surge_config_keyword(old: str) -> Callable[[_Function], _Function]:
    """Decorate a function whose `SurgeConfig` parameter was renamed `surge_config`: until the next release it also
    takes the previous release's keyword `old`, with a `FutureWarning` naming the new one (positional calls are
    unchanged). Passing both is a `TypeError`."""

    def decorate(function: _Function) -> _Function:
        @functools.wraps(function)
        def accepting_old_keyword(*args: Any, **kwargs: Any) -> Any:
            if old in kwargs:
                name = function.__qualname__.removesuffix(".__init__")
                if "surge_config" in kwargs:
                    raise TypeError(f"{name}() got both surge_config= and {old}= (its previous name); pass "
                                    "surge_config= only.")
                warnings.warn(f"{name}({old}=...) was renamed {name}(surge_config=...); {old}= works until the next "
                              "release. See CHANGELOG.md.", FutureWarning, stacklevel=2)
                kwargs["surge_config"] = kwargs.pop(old)
            return function(*args, **kwargs)

        return accepting_old_keyword  # type: ignore[return-value]

    return decorate


def renamed_module_attributes(module: str, renames: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` serving each previous name in `renames` (old -> new) as the object of its new name,
    with a `FutureWarning` naming it, until the next release."""

    def __getattr__(name: str) -> Any:
        if name not in renames:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(f"{module}.{name} was renamed {module}.{renames[name]}; the old name works until the next "
                      "release. See CHANGELOG.md.", FutureWarning, stacklevel=2)
        return getattr(sys.modules[module], renames[name])

    return __getattr__

def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"SurgeConfig.{name}={value!r} is not valid; allowed values: {', '.join(allowed)}.")


@dataclass(frozen=True)
class SurgeConfig:
    """The SURGE binarization recipe: immutable, validated once at construction (`replace` makes a validated copy).

    Args:
        target_modules: modules to binarize. A string is a regular expression matched in full against module names;
            a list (held as a tuple) matches a module whose name equals an entry or ends with `"." + entry` (as in
            peft). `None` uses the default of the model's architecture (`DEFAULT_TARGET_MODULES`, keyed by
            `model.config.model_type`).
        exclude_modules: modules never binarized, same matching rules as `target_modules`.
        binarize_weights: binarize weights (`W1`); when False the layer keeps full-precision weights.
        binarize_activations: binarize the layer input (`A1`); when False the input stays real-valued.
        weight_scale: `"channel"` multiplies sign(W) by the per-output-channel mean |W|, `"tensor"` by one mean
            |W| for the whole tensor, `"none"` by 1.
        activation_binarizer: `"sign"` is sign(x); `"rsign"` is sign(x - tau) with a learnable threshold tau per
            input feature/channel (ReActNet); `"elastic"` is s * sign(x - tau) with a learnable scale s as well
            (BiT).
        activation_bits: bits k of the layer inputs, one of 1, 2, 4, 8 (W1A{k}). k > 1 quantizes uniformly,
            s * clamp(round((x - tau) / s), -2^(k-1), 2^(k-1) - 1), with a learnable step s and threshold tau
            (needs `activation_binarizer="elastic"`); W1A8 is BinaryBERT's deployment point.
        weight_planes: binary planes per weight. 1 is the 1-bit weight alpha * sign(W). 2 is a residual two-plane
            weight alpha_1 s_1 + alpha_2 s_2 (s_1 = sign(W), s_2 = sign(W - alpha_1 s_1), each alpha the
            `weight_scale` of what its plane binarizes): 2 bits per weight, a training stage that a 1-bit model
            starts from (`--weight_planes_schedule 2,1`); it cannot be packed. Needs a `weight_scale`.
        unsigned_activation_modules: modules (same matching rules as `target_modules`) whose inputs are
            non-negative, e.g. after ReLU/GELU: their codes are clamp(round((x - tau) / s), 0, 2^k - 1), which for
            k = 1 is BiT's {0, s} binarizer (needs `activation_binarizer="elastic"`).
        learnable_weight_scale: make alpha a trained parameter per output channel (or per tensor), initialised
            from the weight (`weight_scale`) and set from data by `calibrate`; else alpha is recomputed from the
            latent weight at every step.
        surrogate: the surrogate derivative of `sign` used for activations (see `quantizers.SURROGATE_FUNCTIONS`).
        swish_beta: the sharpness beta of the `swish_sign` surrogate.
        compensator: `"surge"` adds the auxiliary branch with lam from the Adaptive Gradient Scaler; `"fixed"` adds
            it with a constant lam = eta (ablation: no AGS); `"ste"` has no auxiliary branch (plain STE).
        eta: the AGS hyper-parameter in lam = eta * ||g_b|| / (||g_a|| + eps); the constant lam for `"fixed"`.
        aux_weight: `"separate"` gives the auxiliary branch its own weight W_a, initialised as a copy of the latent
            weight; `"shared"` uses the latent weight itself as W_a; `"frozen"` keeps W_a at that copy (a buffer, never
            trained): the backward pass skips W_a's gradient G_a = g_y^T x and the optimizer holds no state for it.
        lambda_placement: `"fork"` applies lam computed from this step's gradients at an identity fork of the layer
            input; `"previous"` applies lam computed at the previous step (first step: lam = 0).
        scale_aux_grad: multiply the gradient that reaches W_a by lam as well (else W_a gets the unscaled
            gradient g_y^T x).
        aux_loss_weight: weight of the auxiliary-branch loss mean((W_a x - f_b)^2) per layer (0 disables it; when on,
            the auxiliary forward product must be computed).
        eps: the epsilon in the AGS denominator.
        shortcuts: wrap every binarized Linear in a `shortcuts.ShortcutLinear`: LayerNorm of its output plus a
            (repeat / average-pool) shortcut of its input, a gate and an RPReLU (Bi-Real / ReActNet / BinaryViT).
        shortcut_gate_init: the gate's initial value: 1 for training from scratch, 0 to keep a trained model's
            function exactly at step 0.
        binarize_attention: binarize both attention matmuls (`binary_attention`): sign(Q) sign(K)^T, and attention
            probabilities binarized to {0, alpha} with a learnable alpha per head.
        attention_alpha_init: the initial alpha of the binarized attention probabilities.
        version: the recipe format version.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    binarize_weights: bool = True
    binarize_activations: bool = True
    weight_scale: str = field(default="channel", metadata={"choices": WEIGHT_SCALES})
    activation_binarizer: str = field(default="elastic", metadata={"choices": ACTIVATION_BINARIZERS})
    activation_bits: int = 1
    weight_planes: int = 1
    unsigned_activation_modules: str | list[str] | None = None
    learnable_weight_scale: bool = False
    surrogate: str = field(default="clipped_ste", metadata={"choices": SURROGATES})
    swish_beta: float = 5.0
    compensator: str = field(default="surge", metadata={"choices": COMPENSATORS})
    eta: float = 0.1
    aux_weight: str = field(default="separate", metadata={"choices": AUX_WEIGHTS})
    lambda_placement: str = field(default="fork", metadata={"choices": LAMBDA_PLACEMENTS})
    scale_aux_grad: bool = False
    aux_loss_weight: float = 0.0
    eps: float = 1e-8
    shortcuts: bool = False
    shortcut_gate_init: float = 1.0
    binarize_attention: bool = False
    attention_alpha_init: float = 0.05
    version: int = field(default=SURGE_CONFIG_VERSION)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the field and its allowed values for the first invalid field."""
        _choice("weight_scale", self.weight_scale, WEIGHT_SCALES)
        _choice("activation_binarizer", self.activation_binarizer, ACTIVATION_BINARIZERS)
        _choice("surrogate", self.surrogate, SURROGATES)
        _choice("compensator", self.compensator, COMPENSATORS)
        _choice("aux_weight", self.aux_weight, AUX_WEIGHTS)
        _choice("lambda_placement", self.lambda_placement, LAMBDA_PLACEMENTS)
        for name in ("eta", "swish_beta", "eps", "aux_loss_weight", "shortcut_gate_init",
                     "attention_alpha_init"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SurgeConfig.{name}={value!r} must be a finite number.")
        if self.eta < 0:
            raise ValueError(f"SurgeConfig.eta={self.eta!r} must be >= 0.")
        if self.swish_beta <= 0 or self.eps <= 0:
            raise ValueError("SurgeConfig.swish_beta and SurgeConfig.eps must be > 0.")
        if self.attention_alpha_init <= 0:
            raise ValueError(f"SurgeConfig.attention_alpha_init={self.attention_alpha_init!r} must be > 0.")
        if self.aux_loss_weight < 0:
            raise ValueError(f"SurgeConfig.aux_loss_weight={self.aux_loss_weight!r} must be >= 0.")
        if isinstance(self.activation_bits, bool) or self.activation_bits not in ACTIVATION_BITS:
            raise ValueError(
                f"SurgeConfig.activation_bits={self.activation_bits!r} is not valid; allowed values: "
                f"{', '.join(map(str, ACTIVATION_BITS))}."
            )
        if isinstance(self.weight_planes, bool) or self.weight_planes not in WEIGHT_PLANES:
            raise ValueError(
                f"SurgeConfig.weight_planes={self.weight_planes!r} is not valid; allowed values: "
                f"{', '.join(map(str, WEIGHT_PLANES))}."
            )
        if self.weight_planes > 1 and (not self.binarize_weights or self.weight_scale == "none"):
            raise ValueError(
                f"SurgeConfig.weight_planes={self.weight_planes} needs binary weights with a scale per plane: set "
                "binarize_weights=True and weight_scale='channel' or 'tensor', or weight_planes=1."
            )
        uniform = self.activation_bits > 1 or self.unsigned_activation_modules is not None
        if uniform and self.activation_binarizer != "elastic":
            raise ValueError(
                f"SurgeConfig.activation_bits={self.activation_bits} / unsigned_activation_modules need a learnable "
                f"step size, but activation_binarizer={self.activation_binarizer!r} has none; set "
                "activation_binarizer='elastic'."
            )
        if self.learnable_weight_scale and self.weight_scale == "none":
            raise ValueError(
                "SurgeConfig.learnable_weight_scale=True needs weight_scale='channel' or 'tensor' (the shape and "
                "initial value of the learned scale), not 'none'."
            )
        for name in ("binarize_weights", "binarize_activations", "scale_aux_grad", "learnable_weight_scale",
                     "shortcuts", "binarize_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SurgeConfig.{name}={getattr(self, name)!r} must be True or False.")
        for name in MODULE_PATTERN_FIELDS:
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f"SurgeConfig.{name}={value!r} must be a regular expression string, a non-empty list of "
                    "module-name suffixes, or None."
                )
            object.__setattr__(self, name, tuple(value))
        for name in MODULE_PATTERN_FIELDS:
            pattern = getattr(self, name)
            if isinstance(pattern, str):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(
                        f"SurgeConfig.{name}={pattern!r} is not a valid regular expression ({error}); fix the "
                        "pattern, or pass a list of module-name suffixes instead."
                    ) from None
        if self.version != SURGE_CONFIG_VERSION:
            raise ValueError(
                f"SurgeConfig.version={self.version!r} is not supported by this surge_hf; it reads version "
                f"{SURGE_CONFIG_VERSION}. Upgrade surge_hf to load this recipe."
            )
        if self.aux_weight == "frozen" and (self.aux_loss_weight > 0 or self.scale_aux_grad):
            raise ValueError(
                "SurgeConfig.aux_weight='frozen' never trains W_a, but aux_loss_weight > 0 / scale_aux_grad=True act "
                "on W_a's training; set aux_weight='separate', or aux_loss_weight=0 and scale_aux_grad=False."
            )
        if self.compensator == "ste" and self.aux_loss_weight > 0:
            raise ValueError(
                "SurgeConfig.aux_loss_weight > 0 needs an auxiliary branch, but compensator='ste' has none; "
                "set compensator to 'surge' or 'fixed', or aux_loss_weight to 0."
            )

    @property
    def packable(self) -> bool:
        """Whether finalized layers can store the weights as packed 1-bit signs (one weight plane)."""
        return self.weight_planes == 1

    @property
    def has_aux_branch(self) -> bool:
        """Whether binarized layers carry the DPGC auxiliary branch."""
        return self.compensator != "ste"

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict (module lists as lists): the form written to `config.json`."""
        fields = dataclasses.asdict(self)
        for name in MODULE_PATTERN_FIELDS:
            if isinstance(fields[name], tuple):
                fields[name] = list(fields[name])
        return fields

    @classmethod
    def from_dict(cls, recipe: dict[str, Any]) -> SurgeConfig:
        """Build a validated config. Unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise ValueError(
                f"Unknown SURGE recipe key(s) {unknown}; known keys: {', '.join(sorted(known))}. "
                "Remove or rename them."
            )
        return cls(**recipe)

    def replace(self, **changes: Any) -> SurgeConfig:
        """A validated copy with some fields changed."""
        return SurgeConfig.from_dict({**self.to_dict(), **changes})
