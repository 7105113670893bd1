"""Model cards of trained surge_hf models: the README.md a training run leaves in its output folder.

`render_model_card` fills the Jinja2 templates in `model_cards/` (Hub YAML front matter built with
`huggingface_hub.ModelCardData`, so the Hub parses it); `write_model_card` writes the card into a model's folder.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import jinja2
from huggingface_hub import EvalResult, ModelCardData

from ..configuration_surge import renamed_surge_config_keyword
from .upload import check_repo_id

__all__ = ["ModelCardContext", "render_model_card", "write_model_card"]

Kind = Literal["text", "image"]

# Per kind: the Jinja2 template and the Hub task (pipeline_tag and model-index task type).
_TEMPLATES: dict[str, str] = {"text": "text.md.j2", "image": "image.md.j2"}
_TASKS: dict[str, str] = {"text": "text-classification", "image": "image-classification"}

_BASE_TAGS = ("surge", "binary-neural-network", "1-bit")

# Display names of the metrics that GLUE and image classification report; others are derived from the key.
_METRIC_NAMES = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "matthews_correlation": "Matthews correlation",
    "pearson": "Pearson correlation",
    "spearmanr": "Spearman correlation",
}


@dataclass(frozen=True)
class ModelCardContext:
    """Everything a model card says about one trained model.

    Required:
        repo_id: Hub id the card tells users to load, `namespace/name` or `name`.
        dataset_name: human-readable dataset name shown in the card and model-index ("GLUE SST-2").
        dataset_type: Hub dataset id, used for `datasets` and model-index (`nyu-mll/glue`).
        dataset_split: split the metrics were measured on ("validation").
        metrics: metric type -> value as measured ({"accuracy": 0.7012}); values are written unrounded to
            the model-index.
        surge_config: the SURGE recipe as a plain JSON-able dict (`SurgeConfig.to_dict()`, as in `config.json`).
        learning_rate, num_epochs, seed: the training run's optimiser settings.
        bit_account: the pre-formatted text table from `surge_hf.summary()`.
        packed_bytes: size of the packed `model.safetensors` file.
        float32_bytes: size of the same weights stored in float32.

    Optional:
        base_model: Hub id of the pretrained model fine-tuned from; None when trained from scratch.
        local_base_model: the local folder fine-tuned from (relative to the output folder, never an absolute path of
            the training machine) when there is no Hub id to name.
        dataset_config: dataset configuration ("sst2"), None when the dataset has one.
        language: language code(s) of a text model ("en"); required for text cards, not allowed for image cards.
        distillation: the teacher distilled from (Hub id or short description); None when no teacher was used.
        hyperparameters: further training settings shown in the recipe table (batch size, max length, ...).
        license: Hub license identifier.
        tags: extra Hub tags, added after `surge`, `binary-neural-network`, `1-bit`.
        model_name: title of the card and model-index name; defaults to the name part of `repo_id`.
        description: a free paragraph added after the model summary.
        image_mode: PIL mode of the images an image model takes ("L" for grayscale, "RGB"), for the usage example.
        command: the command line that trained the model, shown under the recipe.
        deployment: `DeploymentReport.to_dict()` of the packed model, measured where the card was made (speed
            against float32, weights in memory).
        labels: the class names the model predicts, in class-id order (its config's `id2label`); empty for a
            regression model.
    """

    repo_id: str
    dataset_name: str
    dataset_type: str
    dataset_split: str
    metrics: Mapping[str, float]
    surge_config: Mapping[str, Any]
    learning_rate: float
    num_epochs: float
    seed: int
    bit_account: str
    packed_bytes: int
    float32_bytes: int
    base_model: str | None = None
    local_base_model: str | None = None
    dataset_config: str | None = None
    language: str | list[str] | None = None
    distillation: str | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    license: str = "apache-2.0"
    tags: Sequence[str] = ()
    model_name: str | None = None
    description: str | None = None
    image_mode: str = "RGB"
    command: str | None = None
    deployment: Mapping[str, Any] | None = None
    labels: Sequence[str] = ()

    def __post_init__(self) -> None:
        check_repo_id(self.repo_id)
        for name in ("dataset_name", "dataset_type", "dataset_split", "bit_account", "license"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"ModelCardContext.{name} must be a non-empty string, got {value!r}.")
        for name in ("base_model", "local_base_model", "dataset_config", "distillation", "model_name", "description",
                     "command"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"ModelCardContext.{name} must be a non-empty string or None, got {value!r}.")
        if not isinstance(self.metrics, Mapping) or not self.metrics:
            raise ValueError(
                "ModelCardContext.metrics must be a non-empty mapping of metric type to value, "
                f"e.g. {{'accuracy': 0.70}}; got {self.metrics!r}."
            )
        for metric, value in self.metrics.items():
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"ModelCardContext.metrics[{metric!r}] must be a finite number, got {value!r}.")
        if not isinstance(self.surge_config, Mapping) or not self.surge_config:
            raise ValueError(
                "ModelCardContext.surge_config must be the non-empty recipe dict (SurgeConfig.to_dict()), "
                f"got {self.surge_config!r}."
            )
        try:
            json.dumps(self.surge_config)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"ModelCardContext.surge_config must be JSON-serialisable (plain dicts, lists, numbers, strings): "
                f"{error}."
            ) from error
        for name in ("learning_rate", "num_epochs"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"ModelCardContext.{name} must be a positive number, got {value!r}.")
        if not _is_int(self.seed):
            raise ValueError(f"ModelCardContext.seed must be an int, got {self.seed!r}.")
        for name in ("packed_bytes", "float32_bytes"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ValueError(f"ModelCardContext.{name} must be a positive int (bytes), got {value!r}.")
        if not isinstance(self.hyperparameters, Mapping):
            raise ValueError(f"ModelCardContext.hyperparameters must be a mapping, got {self.hyperparameters!r}.")
        if self.image_mode not in ("L", "RGB"):
            raise ValueError(f"ModelCardContext.image_mode must be 'L' or 'RGB', got {self.image_mode!r}.")
        for name in ("tags", "labels"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"ModelCardContext.{name} must be a list of non-empty strings, got {value!r}.")

    @property
    def surge_recipe(self) -> Mapping[str, Any]:
        """The previous name of `surge_config`: its value, with a `FutureWarning` (until the next release)."""
        warnings.warn("ModelCardContext.surge_recipe was renamed ModelCardContext.surge_config; surge_recipe works "
                      "until the next release. See CHANGELOG.md.", FutureWarning, stacklevel=2)
        return self.surge_config

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelCardContext:
        """Build a context from a plain dict, naming every missing or unknown key (`surge_recipe`, the previous
        name of `surge_config`, is taken with a `FutureWarning` until the next release)."""
        known = {f.name for f in fields(cls)} | {"surge_recipe"}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        required -= {"surge_config"} if "surge_recipe" in values else set()
        unknown = sorted(set(values) - known)
        missing = sorted(required - set(values))
        if unknown or missing:
            problems = []
            if missing:
                problems.append(f"missing required keys {missing}")
            if unknown:
                problems.append(f"unknown keys {unknown} (valid keys: {sorted(known)})")
            raise ValueError(f"Model card context: {'; '.join(problems)}.")
        return cls(**values)



ModelCardContext.__init__ = renamed_surge_config_keyword("surge_recipe")(ModelCardContext.__init__)

def _is_real(value: Any) -> bool:
    """True for real numbers (Python or numpy ints and floats), False for bools and everything else."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    """True for Python or numpy integers, False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _template_environment() -> jinja2.Environment:
    """Jinja2 environment over the model_cards/ templates.

    They are looked up next to this module (an installed wheel that maps `model_cards/` into `surge_hf.hub`) and
    at the repository root (a source checkout or editable install).
    """
    here = Path(__file__).resolve().parent
    installed, checkout = here / "model_cards", here.parents[1] / "model_cards"
    folders = [str(folder) for folder in (installed, checkout) if folder.is_dir()]
    if not folders:
        raise FileNotFoundError(
            f"Model card templates not found in {installed} or {checkout}: install surge_hf with its package data "
            "(model_cards/*.j2) or run from a source checkout."
        )
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folders),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _card_data(kind: Kind, context: ModelCardContext, model_name: str) -> ModelCardData:
    """Hub metadata (YAML front matter), with one model-index result per metric."""
    eval_results = [
        EvalResult(
            task_type=_TASKS[kind],
            dataset_type=context.dataset_type,
            dataset_name=context.dataset_name,
            dataset_config=context.dataset_config,
            dataset_split=context.dataset_split,
            metric_type=metric,
            metric_value=float(value),
            metric_name=_metric_name(metric),
        )
        for metric, value in context.metrics.items()
    ]
    return ModelCardData(
        base_model=context.base_model,
        datasets=[context.dataset_type],
        language=context.language if kind == "text" else None,
        library_name="transformers",
        license=context.license,
        metrics=list(context.metrics),
        pipeline_tag=_TASKS[kind],
        tags=[*_BASE_TAGS, *(tag for tag in context.tags if tag not in _BASE_TAGS)],
        model_name=model_name,
        eval_results=eval_results,
    )


def _metric_name(metric: str) -> str:
    return _METRIC_NAMES.get(metric, metric.replace("_", " ").capitalize())


def _table_cell(value: Any) -> str:
    """A value as one markdown table cell (pipes escaped, newlines flattened)."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _size(num_bytes: int) -> str:
    return f"{num_bytes:,} ({num_bytes / 2**20:.2f} MiB)"


def render_model_card(kind: Kind, context: ModelCardContext | Mapping[str, Any]) -> str:
    """Render the model card (README.md text) of a binary text ("text") or image ("image") classifier.

    The front matter holds license, base_model (absent when trained from scratch or from a local folder), datasets,
    language (text), metrics, tags, pipeline_tag, library_name and a model-index with one result per metric. The
    size ratio in the body is `float32_bytes / packed_bytes`.
    """
    if kind not in _TEMPLATES:
        raise ValueError(f"kind must be one of {sorted(_TEMPLATES)}, got {kind!r}.")
    if not isinstance(context, ModelCardContext):
        if not isinstance(context, Mapping):
            raise ValueError(f"context must be a ModelCardContext or a dict, got {type(context).__name__}.")
        context = ModelCardContext.from_dict(context)
    if kind == "text" and context.language is None:
        raise ValueError("A text model card needs the language of its data: pass language='en' (or a list).")
    if kind == "image" and context.language is not None:
        raise ValueError("language applies to text models only; pass language=None for an image card.")

    model_name = context.model_name or context.repo_id.split("/")[-1]
    hyperparameters = [
        ("learning rate", f"{context.learning_rate:g}"),
        ("epochs", f"{context.num_epochs:g}"),
        ("seed", str(context.seed)),
        ("distillation", f"from {context.distillation}" if context.distillation else "none"),
        *((name, _table_cell(value)) for name, value in context.hyperparameters.items()),
    ]
    template = _template_environment().get_template(_TEMPLATES[kind])
    return template.render(
        card_data=_card_data(kind, context, model_name).to_yaml(),
        model_name=model_name,
        repo_id=context.repo_id,
        base_model=context.base_model,
        local_base_model=context.local_base_model,
        dataset_name=_table_cell(context.dataset_name),
        dataset_config=context.dataset_config,
        dataset_split=_table_cell(context.dataset_split),
        description=context.description,
        image_mode=context.image_mode,
        hyperparameters=hyperparameters,
        surge_recipe_json=json.dumps(context.surge_config, indent=2, sort_keys=True),
        command=context.command,
        metric_rows=[
            {"name": _table_cell(_metric_name(metric)), "value": f"{float(value):.4f}"}
            for metric, value in context.metrics.items()
        ],
        bit_account=context.bit_account.rstrip(),
        packed_size=_size(context.packed_bytes),
        float32_size=_size(context.float32_bytes),
        size_ratio=f"{context.float32_bytes / context.packed_bytes:.1f}",
        deployment=context.deployment,
        labels=list(context.labels),
    )


def write_model_card(
    output_dir: str | os.PathLike[str], kind: Kind, context: ModelCardContext | Mapping[str, Any]
) -> Path:
    """Render the card and write it to `output_dir/README.md` atomically (temp file, fsync, `os.replace`)."""
    directory = Path(output_dir)
    if not directory.is_dir():
        raise ValueError(f"output_dir {directory} is not a directory: save the model there first.")
    text = render_model_card(kind, context)
    target = directory / "README.md"
    # Opened like any new file (mode 0666 less the umask), unlike mkstemp's 0600: a shared folder stays readable.
    temp_name = directory / f".README.md.{uuid.uuid4().hex}.tmp"
    try:
        with open(temp_name, "x", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, target)
    except BaseException:
        temp_name.unlink(missing_ok=True)
        raise
    return target
