"""Library calls that used to go silently wrong, and transformers' own contracts, on the SURGE models: recorded
outputs of binarized transformers models, int8 embeddings, binary attention, the auxiliary loss under gradient
checkpointing, the kernel switch, calibration of packed models, strict export and full-graph compile, custom code
through every Auto class, loading that initialises and reports missing weights, and resizing int8 embeddings."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch._dynamo
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    ViTConfig,
)
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

import surge_hf
from surge_hf import (
    Int8Embedding,
    SurgeBertConfig,
    SurgeBertForQuestionAnswering,
    SurgeBertForSequenceClassification,
    SurgeBertForTokenClassification,
    SurgeBertModel,
    SurgeConfig,
    SurgeViTConfig,
    SurgeViTForImageClassification,
    SurgeViTModel,
    kernels,
)

ROOT = Path(__file__).resolve().parents[1]
WORD = "bert.embeddings.word_embeddings"
BERT_CLASSES = (SurgeBertModel, SurgeBertForSequenceClassification, SurgeBertForTokenClassification,
                SurgeBertForQuestionAnswering)
VIT_CLASSES = (SurgeViTModel, SurgeViTForImageClassification)


def bert_config(**changes) -> BertConfig:
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertConfig(**{**fields, **changes})


def vit_config(**changes) -> ViTConfig:
    fields = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    return ViTConfig(**{**fields, **changes})


def surge_model(cls, recipe: SurgeConfig | None = None):
    """A tiny SURGE model of class `cls` (BERT or ViT), seeded."""
    torch.manual_seed(0)
    if cls in VIT_CLASSES:
        return cls(SurgeViTConfig.from_base_config(vit_config(), surge_config=recipe))
    return cls(SurgeBertConfig.from_bert_config(bert_config(), surge_config=recipe))


def model_inputs(cls) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if cls in VIT_CLASSES:
        return {"pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}
    return {"input_ids": torch.randint(1, 99, (2, 7), generator=generator),
            "attention_mask": torch.ones(2, 7, dtype=torch.long)}


def exact(message: str) -> str:
    return "^" + re.escape(message) + "$"


def run_python(script: str, *args: str, cwd: Path = ROOT, without_surge_hf: bool = False, **env: str) -> dict:
    """Run `script` in a fresh interpreter in `cwd` and return the JSON it prints after `REPORT=`.
    `without_surge_hf` runs it where surge_hf cannot be imported (custom code only; `cwd` must not hold it)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    environment.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    if without_surge_hf:
        command = [sys.executable, "-I", "-c", NO_SURGE_HF + script, *args]  # -I: no PYTHONPATH, no cwd on sys.path
    else:
        command = [sys.executable, "-c", script, *args]
        environment["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.rpartition("REPORT=")[2])


NO_SURGE_HF = textwrap.dedent(
    """
    import sys


    class NoSurgeHf:  # this interpreter has no surge_hf (it may be installed, editable, in site-packages)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "surge_hf":
                raise ModuleNotFoundError(f"No module named {name!r}")


    sys.meta_path.insert(0, NoSurgeHf())
    """
)


# -------------------------------------------------------------- 8. outputs a binarized transformers model records
RECORDED_OUTPUTS = textwrap.dedent(
    """
    import copy, json
    import torch
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    import surge_hf
    from surge_hf.training.objective import DistillationConfig, compute_loss

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 attn_implementation="eager")
    bert = BertForSequenceClassification(BertConfig(vocab_size=99, num_labels=3, **small))
    teacher = copy.deepcopy(bert)
    vit = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_labels=3, **small))
    ids = torch.randint(1, 99, (2, 7))
    report = {}
    batches = {"bert": {"input_ids": ids}, "vit": {"pixel_values": torch.randn(2, 3, 8, 8)}}
    for name, model in [("bert", bert), ("vit", vit)]:
        surge_hf.binarize(model)
        outputs = model(**batches[name], output_hidden_states=True, output_attentions=True)
        report[name] = [type(model).__name__, len(outputs.hidden_states), len(outputs.attentions)]
    loss, _ = compute_loss(bert.train(), {"input_ids": ids, "labels": torch.tensor([0, 2])}, teacher=teacher,
                           distillation=DistillationConfig(hidden_states_weight=1.0, attentions_weight=1.0))
    report["distillation_loss_is_finite"] = bool(torch.isfinite(loss))
    print("REPORT=" + json.dumps(report))
    """
)


def test_binarized_transformers_models_record_hidden_states_and_attentions_in_a_fresh_process():
    """In a process where no SURGE model was built before, the class that binarize() gives a transformers model
    must still know what it can record (transformers registers it when an instance of the class is built)."""
    assert run_python(RECORDED_OUTPUTS) == {
        "bert": ["SurgeBertForSequenceClassification", 3, 2],
        "vit": ["SurgeViTForImageClassification", 3, 2],
        "distillation_loss_is_finite": True,
    }


# ----------------------------------------------------------------------------------------- 9. int8 embeddings
def test_quantize_embeddings_refuses_a_plain_transformers_model():
    plain = BertForSequenceClassification(bert_config())
    with pytest.raises(ValueError, match=exact(
            "quantize_embeddings() on a BertForSequenceClassification: its from_pretrained would not know the "
            "quantized tables that save_pretrained writes and would reload the model with random embeddings. Binarize "
            "it with surge_hf.binarize and finalize it (a SURGE model records its quantized embeddings in its "
            "config), or keep its embeddings in full precision.")):
        surge_hf.quantize_embeddings(plain)
    assert type(plain.get_submodule(WORD)) is nn.Embedding


def test_quantize_embeddings_refuses_trainable_surge_layers():
    message = exact(
        "quantize_embeddings() applies to a packed (inference) model: this one has trainable SURGE layers, which "
        "would train around frozen quantized tables, and its train-form checkpoint would not load them. Call "
        "model.finalize() (surge_hf.finalize(model)) first.")
    train_form = surge_model(SurgeBertForSequenceClassification)
    with pytest.raises(ValueError, match=message):
        surge_hf.quantize_embeddings(train_form)
    module = surge_hf.binarize(nn.Sequential(nn.Embedding(9, 4), nn.Linear(4, 4)), SurgeConfig(target_modules=["1"]))
    with pytest.raises(ValueError, match=message):
        surge_hf.quantize_embeddings(module)
    assert type(train_form.get_submodule(WORD)) is nn.Embedding and type(module[0]) is nn.Embedding


def test_quantize_embeddings_function_records_the_tables_of_a_surge_model(tmp_path):
    model = surge_model(SurgeBertForSequenceClassification).finalize()
    assert surge_hf.quantize_embeddings(model, [WORD]) == [WORD]
    assert model.config.surge_int8_embeddings == [WORD]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    inputs = model_inputs(SurgeBertForSequenceClassification)
    assert type(reloaded.get_submodule(WORD)) is Int8Embedding
    assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


# ------------------------------------------------------------------------------------------ 10. binary attention
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_binary_attention_refuses_a_float_attention_implementation(implementation, tmp_path):
    message = exact(
        "This SurgeBertForSequenceClassification binarizes its attention (SurgeConfig.binarize_attention=True), "
        "which runs as the attention implementation 'surge_binary'; "
        f"attn_implementation={implementation!r} would compute it in full precision while the recipe says binary. "
        "Keep 'surge_binary', or use a recipe with binarize_attention=False (binarize the float model again).")
    model = surge_model(SurgeBertForSequenceClassification, SurgeConfig(binarize_attention=True))
    with pytest.raises(ValueError, match=message):
        model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == "surge_binary"
    model.set_attn_implementation("surge_binary")
    model.save_pretrained(tmp_path)
    for loader in (SurgeBertForSequenceClassification, AutoModelForSequenceClassification):
        with pytest.raises(ValueError, match=message):
            loader.from_pretrained(tmp_path, attn_implementation=implementation)
    assert AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="surge_binary").config._attn_implementation == "surge_binary"
    binarized = surge_hf.binarize(BertForSequenceClassification(bert_config()), SurgeConfig(binarize_attention=True))
    with pytest.raises(ValueError, match=message):
        binarized.set_attn_implementation(implementation)


def test_float_attention_implementations_stay_free_without_binary_attention():
    model = surge_model(SurgeBertForSequenceClassification)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"


# ------------------------------------------------------------- 11. auxiliary loss under gradient checkpointing
def _loss_and_gradients(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    outputs = model(**batch)
    outputs.loss.backward()
    return outputs.loss.detach(), outputs.aux_loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_keeps_the_auxiliary_loss_and_its_gradients(use_reentrant):
    model = surge_model(SurgeBertForSequenceClassification, SurgeConfig(aux_loss_weight=0.5)).train()
    batch = {**model_inputs(SurgeBertForSequenceClassification), "labels": torch.tensor([0, 1])}
    loss, aux_loss, gradients = _loss_and_gradients(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    checkpointed_loss, checkpointed_aux_loss, checkpointed = _loss_and_gradients(model, batch)
    assert aux_loss > 0 and torch.equal(checkpointed_aux_loss, aux_loss) and torch.equal(checkpointed_loss, loss)
    assert checkpointed.keys() == gradients.keys()
    for name, gradient in gradients.items():
        assert torch.equal(checkpointed[name], gradient), name


# ---------------------------------------------------------------------------- 12. kernel switch, calibration
@pytest.mark.parametrize(("value", "enabled"), [("1", False), ("true", False), ("YES", False), ("on", False),
                                                ("", True), ("0", True), ("false", True), ("No", True),
                                                ("off", True)])
def test_the_kernel_switch_reads_booleans(monkeypatch, value, enabled):
    monkeypatch.setitem(kernels._state, "loaded", True)  # as if built: only the switch is read
    monkeypatch.setenv(kernels.DISABLE_ENV, value)
    assert kernels.available() is enabled


def test_the_kernel_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "disabled")
    with pytest.raises(ValueError, match=exact(
            "SURGE_HF_DISABLE_KERNELS='disabled' is not a boolean: set it to 1 (or true, yes, on) to turn surge_hf's "
            "CPU kernel off, or to 0 (or false, no, off), or unset it, to keep it on.")):
        kernels.available()


def test_calibrate_refuses_a_packed_model():
    model = surge_model(SurgeBertForSequenceClassification).finalize()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=exact(
            "calibrate() sets the quantizers of trainable SURGE layers, but this model holds packed (finalized) "
            "binary layers, whose thresholds and scales are fixed parts of the trained model. Calibrate before "
            "finalize(), or rebuild trainable layers first with surge_hf.unfinalize(model) (model.unfinalize() for "
            "a SURGE model).")):
        surge_hf.calibrate(model, **model_inputs(SurgeBertForSequenceClassification))
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


# ------------------------------------------------------------------ 13. strict export, full-graph compile (eval)
@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning")  # transformers'
@pytest.mark.parametrize("cls", [*BERT_CLASSES, *VIT_CLASSES], ids=lambda cls: cls.__name__)
def test_strict_export_and_fullgraph_compile_of_every_surge_model_in_eval_mode(cls):
    model = surge_model(cls, SurgeConfig(aux_loss_weight=0.5)).eval()
    batch = model_inputs(cls)
    expected = model(**batch).to_tuple()
    exported = torch.export.export(model, (), batch, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(exported.module()(**batch).to_tuple(), expected, strict=True))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # the graph capture; no C++ build needed
    assert all(torch.equal(a, b) for a, b in zip(compiled(**batch).to_tuple(), expected, strict=True))


# --------------------------------------------------------------------- 14. custom code through every Auto class
CUSTOM_CODE = textwrap.dedent(
    """
    import json
    import torch
    from transformers import AutoModel, AutoModelForQuestionAnswering, AutoModelForTokenClassification

    root = sys.argv[1]
    report = {}
    with torch.no_grad():
        for name, auto_class, folder in [("bert", AutoModel, "bert"), ("qa", AutoModelForQuestionAnswering, "bert"),
                                         ("token", AutoModelForTokenClassification, "bert"), ("vit", AutoModel, "vit")]:
            model = auto_class.from_pretrained(f"{root}/{folder}", trust_remote_code=True).eval()
            inputs = torch.load(f"{root}/{folder}-inputs.pt")
            report[name] = [type(model).__name__, model(**inputs)[0].tolist()]
    print("REPORT=" + json.dumps(report))
    """
)


def test_checkpoints_name_every_auto_class_and_load_through_them_as_custom_code(tmp_path):
    expected = {}
    for name, head, base in [("bert", SurgeBertForSequenceClassification, SurgeBertModel),
                             ("vit", SurgeViTForImageClassification, SurgeViTModel)]:
        surge_model(head).save_pretrained(tmp_path / name, packed=True)
        inputs = model_inputs(head)
        torch.save(inputs, tmp_path / f"{name}-inputs.pt")
        with torch.no_grad():
            expected[name] = base.from_pretrained(tmp_path / name).eval()(**inputs)[0].tolist()
    assert json.loads((tmp_path / "bert" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_surge_bert.SurgeBertConfig",
        "AutoModel": "modeling_surge_bert.SurgeBertModel",
        "AutoModelForQuestionAnswering": "modeling_surge_bert.SurgeBertForQuestionAnswering",
        "AutoModelForSequenceClassification": "modeling_surge_bert.SurgeBertForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_surge_bert.SurgeBertForTokenClassification",
    }
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_surge_vit.SurgeViTConfig",
        "AutoModel": "modeling_surge_vit.SurgeViTModel",
        "AutoModelForImageClassification": "modeling_surge_vit.SurgeViTForImageClassification",
    }
    report = run_python(CUSTOM_CODE, str(tmp_path), cwd=tmp_path, without_surge_hf=True,
                        HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert report["bert"] == ["SurgeBertModel", expected["bert"]]
    assert report["vit"] == ["SurgeViTModel", expected["vit"]]
    assert [report["token"][0], report["qa"][0]] == ["SurgeBertForTokenClassification",
                                                     "SurgeBertForQuestionAnswering"]


# ---------------------------------------------------- 15. from_pretrained initialises and reports missing weights
CONTRACT_RECIPE = SurgeConfig(shortcuts=True, binarize_attention=True, learnable_weight_scale=True,
                              lambda_placement="previous")


@pytest.mark.parametrize("cls", [*BERT_CLASSES, *VIT_CLASSES], ids=lambda cls: cls.__name__)
def test_model_weights_reload_no_missing_tied_weights(cls, tmp_path):
    """transformers' test of the same name (tests/test_modeling_common.py): with every weight gone from the file,
    every parameter and persistent buffer is reported missing, and nothing else."""
    surge_model(cls, CONTRACT_RECIPE).save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded, info = cls.from_pretrained(tmp_path, output_loading_info=True)
    persistent = set(reloaded.state_dict())
    assert not reloaded._keys_to_ignore_on_load_missing  # nothing is expected to go unreported
    assert set(info["missing_keys"]) == persistent
    assert all(torch.isfinite(tensor).all() for tensor in reloaded.state_dict().values())
    layer = next(layer for _, layer in surge_hf.surge_layers(reloaded))
    assert torch.equal(layer.aux_weight, layer.weight)  # initialised from the freshly initialised latent weight


def test_a_plain_checkpoint_loads_with_one_line_instead_of_a_missing_report(tmp_path, caplog):
    BertForSequenceClassification(bert_config()).save_pretrained(tmp_path)
    report = CaptureLogger(transformers_logging.get_logger("transformers.modeling_utils"))
    config_warnings = CaptureLogger(transformers_logging.get_logger("transformers.configuration_utils"))
    with report, config_warnings, caplog.at_level(logging.WARNING, logger="surge_hf"):
        model, info = SurgeBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert config_warnings.out == ""  # a `bert` checkpoint is what a SURGE BERT is built from: no type warning
    assert [record.getMessage() for record in caplog.records if record.name.startswith("surge_hf")] == [
        f"SurgeBertForSequenceClassification: {tmp_path} holds none of the 36 tensors that the SURGE recipe adds; "
        "they were initialised as binarize() does: input_threshold = 0, input_scale = 1, aux_weight = weight."]
    assert "LOAD REPORT" not in report.out and "MISSING" not in report.out
    assert len(info["missing_keys"]) == 36 and all(
        key.endswith(("aux_weight", "input_threshold", "input_scale")) for key in info["missing_keys"])


def test_weights_that_the_recipe_does_not_add_stay_in_the_missing_report(tmp_path, caplog):
    BertModel(bert_config()).save_pretrained(tmp_path)  # no classification head
    report = CaptureLogger(transformers_logging.get_logger("transformers.modeling_utils"))
    with report, caplog.at_level(logging.WARNING, logger="surge_hf"):
        _, info = SurgeBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert [record.getMessage() for record in caplog.records if record.name.startswith("surge_hf")] == [
        f"SurgeBertForSequenceClassification: {tmp_path} holds none of the 36 tensors that the SURGE recipe adds; "
        "they were initialised as binarize() does: input_threshold = 0, input_scale = 1, aux_weight = weight."]
    missing_rows = sorted(line.split("|")[0].strip() for line in report.out.splitlines() if "| MISSING" in line)
    assert missing_rows == ["classifier.bias", "classifier.weight"]
    assert {"classifier.bias", "classifier.weight"} < set(info["missing_keys"])


# --------------------------------------------------------------------------- 16. resizing int8 embeddings
def test_resize_token_embeddings_refuses_int8_embeddings():
    model = surge_model(SurgeBertForSequenceClassification).finalize().quantize_embeddings([WORD])
    with pytest.raises(ValueError, match=exact(
            "resize_token_embeddings() cannot resize the int8 input embedding table of this packed model "
            "(config.surge_int8_embeddings): its new rows would need training, which a quantized table cannot get. "
            "Call model.unfinalize() (float embeddings, trainable layers), resize and train, then finalize() and "
            "quantize_embeddings() again.")):
        model.resize_token_embeddings(120)
    assert model.get_input_embeddings().num_embeddings == 99
    packed = surge_model(SurgeBertForSequenceClassification).finalize()
    assert packed.resize_token_embeddings(120).num_embeddings == 120
