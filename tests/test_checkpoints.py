"""Checkpoints of the SURGE transformers models: the train and packed forms, exact round trips, strict loading of
bad checkpoints, Auto classes, custom code without surge_hf installed, Hub-id loading from a local cache, and
checkpoint sizes (tiny, BERT-base shape, the real MiniLM-L6)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch._dynamo
import transformers.modeling_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    ViTConfig,
)

import surge_hf
from hub_cache import make_hub_cache, use_hub_cache
from surge_hf import (
    BinaryLinear,
    SurgeBertConfig,
    SurgeBertForSequenceClassification,
    SurgeBertModel,
    SurgeConfig,
    SurgeLinear,
    SurgeViTConfig,
    SurgeViTForImageClassification,
    binarize,
    summary,
)
from surge_hf.packing import pack_signs
from surge_hf.quantizers import binary_weight_scale
from surge_hf.saving import DiskFullError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
LAYER = "bert.encoder.layer.1.intermediate.dense"
PACKED_LAYER_TENSORS = {"weight_packed", "weight_scale", "bias", "input_threshold", "input_scale"}
TRAIN_LAYER_TENSORS = {"weight", "bias", "aux_weight", "input_threshold", "input_scale"}


def plain_bert_config(**changes) -> BertConfig:
    fields = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fields.update(changes)
    return BertConfig(**fields)


def bert_config(**changes) -> SurgeBertConfig:
    return SurgeBertConfig.from_bert_config(plain_bert_config(**changes), surge_config=SurgeConfig(aux_loss_weight=0.1))


def input_ids() -> torch.Tensor:
    return torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(1))


def trained_model() -> SurgeBertForSequenceClassification:
    """A tiny model after one optimizer step, so that aux weights, thresholds and latent weights all differ from
    what initialisation would give."""
    torch.manual_seed(0)
    model = SurgeBertForSequenceClassification(bert_config()).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=input_ids(), labels=torch.tensor([0, 2])).loss.backward()
    optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """One trained tiny model, saved in both forms, with its eval logits."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = trained_model()
    model.save_pretrained(root / "train")
    model.save_pretrained(root / "packed", packed=True)
    return {"root": root, "model": model, "logits": model(input_ids=input_ids()).logits.detach()}


def tensor_names(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def layer_tensors(names: set[str], layer: str) -> set[str]:
    return {name.removeprefix(layer + ".") for name in names if name.startswith(layer + ".")}


def damaged_copy(saved: dict, name: str, change, form: str = "packed") -> Path:
    """A copy of the checkpoint in `form` ("packed" or "train") whose tensors went through `change(state_dict)`."""
    target = saved["root"] / name
    shutil.copytree(saved["root"] / form, target)
    state = load_file(target / "model.safetensors")
    change(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


# ---------------------------------------------------------------------------------------------- atomic saves
def copy_with_notes(saved: dict, target: Path, form: str = "train") -> dict[str, bytes]:
    """`target`: a copy of the checkpoint in `form` with a file of the user's; returns its files' bytes."""
    shutil.copytree(saved["root"] / form, target)
    (target / "notes.txt").write_text("mine")
    return {path.name: path.read_bytes() for path in target.iterdir()}


@pytest.mark.parametrize("packed", [False, True])
def test_an_interrupted_save_over_a_checkpoint_leaves_it_as_it_was(saved, tmp_path, monkeypatch, packed):
    target = tmp_path / "model"
    old_form = "train" if packed else "packed"  # a config.json written in place would not fit its weights
    before = copy_with_notes(saved, target, old_form)

    def crash(*args, **kwargs):  # after config.json is written, while the weights are
        raise OSError("simulated crash")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", crash)
    with pytest.raises(OSError, match="simulated crash"):
        saved["model"].save_pretrained(target, packed=packed)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no temporary folder left
    monkeypatch.undo()
    loaded = AutoModelForSequenceClassification.from_pretrained(target).eval()
    assert loaded.is_packed is (old_form == "packed")
    assert torch.equal(loaded(input_ids=input_ids()).logits, saved["logits"])


def test_a_full_disk_during_a_save_names_the_folder_and_the_space_needed(saved, tmp_path, monkeypatch):
    target = tmp_path / "model"
    before = copy_with_notes(saved, target)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    staging = tmp_path / ".model.saving"
    with pytest.raises(DiskFullError, match=rf"^No space left on device while writing the model "
                                            rf"{re.escape(str(target))} \(in {re.escape(str(staging))}, now removed\): "
                                            r"it needs about \d[\d,]*\.\d MiB free"):
        saved["model"].save_pretrained(target, packed=True)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == before


def test_a_save_over_a_checkpoint_replaces_it_and_keeps_the_other_files(saved, tmp_path):
    target = tmp_path / "model"
    copy_with_notes(saved, target)
    saved["model"].save_pretrained(target, packed=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
    loaded = AutoModelForSequenceClassification.from_pretrained(target).eval()
    assert loaded.is_packed and torch.equal(loaded(input_ids=input_ids()).logits, saved["logits"])


def test_save_with_push_to_hub_pushes_under_the_folder_name(saved, tmp_path, monkeypatch):
    calls = {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = repo_id
            return SimpleNamespace(repo_id=f"user/{repo_id}")

    def upload(self, working_dir, repo_id, files_timestamps, commit_message=None, **kwargs):
        calls["upload"] = (repo_id, commit_message, sorted(os.listdir(working_dir)))

    monkeypatch.setattr(transformers.modeling_utils, "hf_api", Api)
    monkeypatch.setattr(transformers.PreTrainedModel, "_upload_modified_files", upload)
    saved["model"].save_pretrained(tmp_path / "tiny-surge", packed=True, push_to_hub=True, commit_message="packed")
    saved_files = sorted(os.listdir(tmp_path / "tiny-surge"))
    assert {"config.json", "model.safetensors"} < set(saved_files)
    assert calls == {"create_repo": "tiny-surge", "upload": ("user/tiny-surge", "packed", saved_files)}


# ------------------------------------------------------------------------------------------- the two forms
def test_train_form_holds_latent_and_auxiliary_weights(saved):
    names = tensor_names(saved["root"] / "train")
    assert layer_tensors(names, LAYER) == TRAIN_LAYER_TENSORS
    config = json.loads((saved["root"] / "train" / "config.json").read_text())
    assert config["model_type"] == "surge_bert" and config["surge_packed"] is False
    assert config["surge_config"] == SurgeConfig(aux_loss_weight=0.1).to_dict()


def test_packed_form_holds_bits_and_scales_only(saved):
    names = tensor_names(saved["root"] / "packed")
    for index in range(2):
        for name in ("attention.self.query", "attention.output.dense", "output.dense"):
            assert layer_tensors(names, f"bert.encoder.layer.{index}.{name}") == PACKED_LAYER_TENSORS
    assert not any("aux_weight" in name for name in names)
    config = json.loads((saved["root"] / "packed" / "config.json").read_text())
    assert config["surge_packed"] is True
    assert config["auto_map"] == {
        "AutoConfig": "configuration_surge_bert.SurgeBertConfig",
        "AutoModel": "modeling_surge_bert.SurgeBertModel",
        "AutoModelForQuestionAnswering": "modeling_surge_bert.SurgeBertForQuestionAnswering",
        "AutoModelForSequenceClassification": "modeling_surge_bert.SurgeBertForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_surge_bert.SurgeBertForTokenClassification",
    }
    latent = saved["model"].get_submodule(LAYER).weight
    with safe_open(saved["root"] / "packed" / "model.safetensors", "pt") as handle:
        bits = handle.get_tensor(f"{LAYER}.weight_packed")
        scale = handle.get_tensor(f"{LAYER}.weight_scale")
        assert handle.get_tensor("classifier.weight").dtype == torch.float32
    assert bits.dtype == torch.uint8 and bits.shape == (37, 4)  # 8 signs per byte: ceil(32 / 8)
    assert torch.equal(bits, pack_signs(latent))
    assert torch.equal(scale, binary_weight_scale(latent, "channel").reshape(-1))  # alpha = mean |W| per output row


def test_save_packed_leaves_the_model_trainable(saved):
    model = saved["model"]
    assert isinstance(model.get_submodule(LAYER), SurgeLinear)
    assert model.config.surge_packed is False and not model.is_packed


def test_train_form_round_trip_is_exact(saved):
    loaded = AutoModelForSequenceClassification.from_pretrained(saved["root"] / "train")
    assert type(loaded) is SurgeBertForSequenceClassification
    expected = saved["model"].state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    layer = loaded.get_submodule(LAYER)
    assert not torch.equal(layer.aux_weight, layer.weight)  # loaded, not re-initialised as a copy
    assert torch.equal(loaded(input_ids=input_ids()).logits, saved["logits"])


def test_packed_checkpoint_loads_packed_layers_with_identical_logits(saved):
    packed, info = AutoModelForSequenceClassification.from_pretrained(saved["root"] / "packed",
                                                                      output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert packed.config.surge_packed and packed.is_packed and not packed.training
    assert isinstance(packed.get_submodule(LAYER), BinaryLinear)
    assert not any(isinstance(module, SurgeLinear) for module in packed.modules())
    finalized = trained_model().finalize()
    with torch.no_grad():
        logits = packed(input_ids=input_ids()).logits
        assert torch.equal(logits, finalized(input_ids=input_ids()).logits)
        assert torch.equal(logits, saved["logits"])
    base = AutoModel.from_pretrained(saved["root"] / "packed")
    assert type(base) is SurgeBertModel and isinstance(base.get_submodule("encoder.layer.0.output.dense"),
                                                       BinaryLinear)


def test_finalize_then_save_writes_the_packed_form(tmp_path):
    model = trained_model()
    surge_hf.finalize(model)  # the core function: the config learns it at save time
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["surge_packed"] is True
    assert layer_tensors(tensor_names(tmp_path), LAYER) == PACKED_LAYER_TENSORS
    other = trained_model().finalize()
    assert other.config.surge_packed is True
    other.save_pretrained(tmp_path / "method")
    assert tensor_names(tmp_path / "method") == tensor_names(tmp_path)


def test_packed_dtype_on_load(saved):
    packed = AutoModelForSequenceClassification.from_pretrained(saved["root"] / "packed", dtype=torch.float16)
    layer = packed.get_submodule(LAYER)
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_scale.dtype == torch.float16
    assert packed.classifier.weight.dtype == torch.float16


def test_packed_model_refuses_training_and_unfinalizes(saved):
    packed = AutoModelForSequenceClassification.from_pretrained(saved["root"] / "packed").train()
    message = ("BinaryLinear is a packed 1-bit inference layer without latent weights and cannot be trained. Call "
               "`surge_hf.unfinalize(model)` to rebuild trainable SURGE layers from the bits, or load the train-form "
               "checkpoint; call `model.eval()` for inference.")
    with pytest.raises(RuntimeError, match=re.escape(message)):
        packed(input_ids=input_ids(), labels=torch.tensor([0, 1]))
    packed.unfinalize()
    assert packed.config.surge_packed is False and not packed.is_packed
    layer = packed.get_submodule(LAYER)
    assert isinstance(layer, SurgeLinear) and torch.equal(layer.aux_weight, layer.weight)
    assert torch.equal(packed.eval()(input_ids=input_ids()).logits, saved["logits"])
    packed.train()(input_ids=input_ids(), labels=torch.tensor([0, 1])).loss.backward()
    assert layer.weight.grad is not None and layer.aux_weight.grad is not None


def test_unfinalize_with_a_new_recipe():
    model = trained_model().finalize()
    model.unfinalize(SurgeConfig(compensator="ste"))
    assert model.config.surge_config == SurgeConfig(compensator="ste")
    assert model.get_submodule(LAYER).aux_weight is None


def test_compiled_packed_model_matches(saved):
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python/platform")
    packed = AutoModelForSequenceClassification.from_pretrained(saved["root"] / "packed")
    compiled = torch.compile(packed, backend="aot_eager")  # inductor gives the same logits up to ~1e-9 (fusion)
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=input_ids()).logits, saved["logits"])


# -------------------------------------------------------------------------------------------------- bad input
def test_missing_scale_is_an_error(saved):
    path = damaged_copy(saved, "no-scale", lambda state: state.pop(f"{LAYER}.weight_scale"))
    message = (f"The packed checkpoint {path} is incomplete: 1 tensor(s) of binarized layers are missing or have "
               f"the wrong shape ({LAYER}.weight_scale). A packed layer cannot be re-initialised; save the "
               "checkpoint again with save_pretrained(path, packed=True) or model.finalize().")
    with pytest.raises(ValueError, match=re.escape(message)):
        AutoModelForSequenceClassification.from_pretrained(path)


def test_wrong_shaped_bits_are_an_error(saved):
    def shrink(state):
        state[f"{LAYER}.weight_packed"] = state[f"{LAYER}.weight_packed"][:, :3].contiguous()

    path = damaged_copy(saved, "bad-shape", shrink)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own check
        AutoModelForSequenceClassification.from_pretrained(path)
    with pytest.raises(ValueError, match=re.escape(f"missing or have the wrong shape ({LAYER}.weight_packed)")):
        AutoModelForSequenceClassification.from_pretrained(path, ignore_mismatched_sizes=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5])
def test_invalid_packed_scale_is_an_error(saved, value):
    def corrupt(state):
        state[f"{LAYER}.weight_scale"][1] = value

    path = damaged_copy(saved, f"scale-{value}", corrupt)
    with pytest.raises(ValueError, match=re.escape(
            f"The packed checkpoint {path} holds invalid weight scales in {LAYER}.weight_scale (NaN, inf, zero or "
            "negative; each is the mean |W| of an output channel and must be > 0). Save the checkpoint again from "
            "the trained model with save_pretrained(path, packed=True).")):
        AutoModelForSequenceClassification.from_pretrained(path)


@pytest.mark.parametrize(("tensor", "value"), [("aux_weight", "aux_weight = weight"),
                                               ("input_threshold", "input_threshold = 0")])
def test_train_form_missing_a_surge_tensor_initialises_it_and_says_so(saved, tensor, value, caplog):
    path = damaged_copy(saved, f"no-{tensor}", lambda state: state.pop(f"{LAYER}.{tensor}"), form="train")
    with caplog.at_level(logging.WARNING, logger="surge_hf"):
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == {f"{LAYER}.{tensor}"}
    assert [record.getMessage() for record in caplog.records if record.name.startswith("surge_hf")] == [
        f"SurgeBertForSequenceClassification: {path} lacks 1 of the 36 tensors that the SURGE recipe adds "
        f"({LAYER}.{tensor}); they were initialised as binarize() does: {value}. Save the checkpoint again if it was "
        "meant to hold them."]
    layer = model.get_submodule(LAYER)
    expected = layer.weight if tensor == "aux_weight" else torch.zeros_like(layer.input_threshold)
    assert torch.equal(getattr(layer, tensor), expected)
    saved_state = saved["model"].state_dict()
    assert all(torch.equal(value, saved_state[key]) for key, value in model.state_dict().items()
               if key != f"{LAYER}.{tensor}")


def test_train_form_missing_a_latent_weight_initialises_and_reports_it(saved):
    """transformers' contract: a missing weight is initialised (`_init_weights`) and listed in missing_keys."""
    path = damaged_copy(saved, "no-weight", lambda state: state.pop(f"{LAYER}.weight"), form="train")
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == {f"{LAYER}.weight"}
    layer, trained = model.get_submodule(LAYER), saved["model"].get_submodule(LAYER)
    assert layer.weight.std().item() == pytest.approx(0.02, rel=0.25)  # BERT's normal(0, 0.02) init
    assert torch.equal(layer.aux_weight, trained.aux_weight)


def test_plain_checkpoint_missing_an_encoder_weight_initialises_it_before_its_surge_tensors(tmp_path):
    torch.manual_seed(0)
    BertForSequenceClassification(plain_bert_config()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop(f"{LAYER}.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model, info = SurgeBertForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    surge_only = {key for key in model.state_dict() if key.endswith(("aux_weight", "input_threshold", "input_scale"))}
    assert info["missing_keys"] == surge_only | {f"{LAYER}.weight"}
    layer = model.get_submodule(LAYER)
    assert torch.equal(layer.aux_weight, layer.weight)


def test_train_form_without_its_recipe_is_an_error(saved, tmp_path):
    shutil.copytree(saved["root"] / "train", tmp_path / "no-recipe")
    config = json.loads((tmp_path / "no-recipe" / "config.json").read_text())
    del config["surge_config"]
    (tmp_path / "no-recipe" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(
            "This surge_bert config has no `surge_config` (the SURGE recipe), so the layers it describes are "
            "unknown. Add the recipe the checkpoint was trained with as `surge_config` in config.json, or pass it: "
            "from_pretrained(path, surge=SurgeConfig(...)).")):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "no-recipe")
    assert AutoModelForSequenceClassification.from_pretrained(saved["root"] / "train").config.surge_config == (
        SurgeConfig(aux_loss_weight=0.1))


def test_truncated_file_is_an_error(saved, tmp_path):
    shutil.copytree(saved["root"] / "packed", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=re.escape(f"Could not read the weights of {tmp_path / 'cut'}: the safetensors "
                                                "file is truncated or corrupted")):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "cut")


def test_packed_checkpoint_into_trainable_layers_is_an_error(saved):
    path = saved["root"] / "packed"
    with pytest.raises(ValueError, match=re.escape(
            f"{path} is a packed (inference) checkpoint (bert.encoder.layer.0.attention.output.dense.weight_packed, "
            "...), but the config asks for trainable layers (surge_packed=False). Load it without overriding "
            "surge_packed and call model.unfinalize() to get a trainable model, or load the train-form checkpoint.")):
        AutoModelForSequenceClassification.from_pretrained(path, surge_packed=False)


def test_unknown_recipe_key_is_an_error(saved, tmp_path):
    shutil.copytree(saved["root"] / "train", tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["surge_config"]["etaa"] = 0.2
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("Unknown SURGE recipe key(s) ['etaa']")):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match=re.escape("Unknown SURGE recipe key(s) ['bits']")):
        SurgeBertForSequenceClassification.from_pretrained(saved["root"] / "train", surge={"bits": 1})


# ------------------------------------------------------------------------------------------- Hub-id loading
def test_hub_id_resolves_from_the_local_cache(saved, tmp_path, monkeypatch):
    make_hub_cache(tmp_path / "hub", "surge/binary-bert", saved["root"] / "packed")
    explicit = AutoModelForSequenceClassification.from_pretrained("surge/binary-bert", cache_dir=tmp_path / "hub",
                                                                  local_files_only=True)
    use_hub_cache(monkeypatch, tmp_path / "hub")
    model = AutoModelForSequenceClassification.from_pretrained("surge/binary-bert")
    assert type(model) is SurgeBertForSequenceClassification and model.is_packed
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids()).logits, saved["logits"])
        assert torch.equal(explicit(input_ids=input_ids()).logits, saved["logits"])
    torch.manual_seed(2)
    plain = BertForSequenceClassification(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=37))
    plain.save_pretrained(tmp_path / "plain")
    make_hub_cache(tmp_path / "hub", "google/tiny-bert", tmp_path / "plain")
    from_plain = SurgeBertForSequenceClassification.from_pretrained("google/tiny-bert")
    layer = from_plain.bert.encoder.layer[0].attention.self.value
    assert torch.equal(layer.weight, plain.bert.encoder.layer[0].attention.self.value.weight)
    assert torch.equal(layer.aux_weight, layer.weight)


# --------------------------------------------------------------------------- custom code, surge_hf not installed
REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys


    class NoSurgeHf:  # makes this interpreter one without surge_hf (CI installs it, editable, in site-packages)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "surge_hf":
                raise ModuleNotFoundError(f"No module named {name!r}")


    sys.meta_path.insert(0, NoSurgeHf())
    import torch
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    try:
        import surge_hf
        raise AssertionError("surge_hf must not be importable here")
    except ModuleNotFoundError:
        pass
    root = sys.argv[1]
    report = {}
    for name, call in [
        ("untrusted", lambda: AutoModelForSequenceClassification.from_pretrained(root + "/packed")),
        ("unregistered", lambda: AutoModelForSequenceClassification.from_pretrained(root + "/no-auto-map")),
    ]:
        try:
            call()
            report[name] = "loaded"
        except ValueError as error:
            report[name] = str(error)
    ids = torch.load(root + "/ids.pt")
    pixels = torch.load(root + "/pixels.pt")
    with torch.no_grad():
        for name in ("packed", "train"):
            model = AutoModelForSequenceClassification.from_pretrained(root + "/" + name, trust_remote_code=True)
            report[name] = [type(model).__name__, type(model.bert.encoder.layer[1].intermediate.dense).__name__,
                            model(input_ids=ids).logits.tolist()]
        model = AutoModelForSequenceClassification.from_pretrained("surge/binary-bert", trust_remote_code=True)
        report["hub"] = model(input_ids=ids).logits.tolist()
        vit = AutoModelForImageClassification.from_pretrained(root + "/vit", trust_remote_code=True)
        report["vit"] = [type(vit.vit.layers[0].mlp.fc1).__name__, vit(pixel_values=pixels).logits.tolist()]
    print("REPORT=" + json.dumps(report))  # after transformers' "[y/N]" prompts, which end without a newline
    """
)


def test_custom_code_loads_without_surge_hf(saved, tmp_path):
    root = saved["root"]
    shutil.copytree(root / "train", tmp_path / "train")
    shutil.copytree(root / "packed", tmp_path / "packed")
    shutil.copytree(root / "packed", tmp_path / "no-auto-map")
    config = json.loads((tmp_path / "no-auto-map" / "config.json").read_text())
    del config["auto_map"]
    (tmp_path / "no-auto-map" / "config.json").write_text(json.dumps(config))
    make_hub_cache(tmp_path / "hub", "surge/binary-bert", root / "packed")
    torch.manual_seed(0)
    vit = SurgeViTForImageClassification(SurgeViTConfig.from_vit_config(ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, image_size=8, patch_size=4,
        num_labels=3))).eval()
    vit.save_pretrained(tmp_path / "vit", packed=True)
    pixels = torch.randn(2, 3, 8, 8)
    torch.save(input_ids(), tmp_path / "ids.pt")
    torch.save(pixels, tmp_path / "pixels.pt")
    (tmp_path / "run.py").write_text(REMOTE_SCRIPT)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    # -I: isolated mode (no PYTHONPATH, no current directory on sys.path), run from a folder without surge_hf.
    result = subprocess.run([sys.executable, "-I", str(tmp_path / "run.py"), str(tmp_path)], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.rpartition("REPORT=")[2])
    assert "contains custom code which must be executed" in report["untrusted"]
    assert "Please pass the argument `trust_remote_code=True`" in report["untrusted"]
    assert "has model type `surge_bert` but Transformers does not recognize this architecture" in report[
        "unregistered"]
    expected = saved["logits"].tolist()
    assert report["packed"] == ["SurgeBertForSequenceClassification", "BinaryLinear", expected]
    assert report["train"] == ["SurgeBertForSequenceClassification", "SurgeLinear", expected]
    assert report["hub"] == expected
    with torch.no_grad():
        assert report["vit"] == ["BinaryLinear", vit.finalize()(pixel_values=pixels).logits.tolist()]


# ------------------------------------------------------------------------------------------ checkpoint sizes
def binarized_layer_bytes(path: Path, model) -> tuple[int, int]:
    """(bytes of the packed bits + scales of the binarized layers in the file, float32 bytes of their weights)."""
    layers = [name for name, module in model.named_modules() if isinstance(module, BinaryLinear)]
    stored = float32 = 0
    with safe_open(path / "model.safetensors", "pt") as handle:
        for name in layers:
            for tensor in ("weight_packed", "weight_scale"):
                part = handle.get_slice(f"{name}.{tensor}")
                stored += math.prod(part.get_shape()) * (1 if part.get_dtype() == "U8" else 4)
            float32 += 4 * math.prod(model.get_submodule(name).weight_shape)
    return stored, float32


def test_bert_base_shape_binarized_layers_are_30x_smaller():
    config = SurgeBertConfig.from_bert_config(BertConfig(), surge_config=SurgeConfig())  # hidden 768, 12 layers, 3072
    with torch.device("meta"):
        account = summary(SurgeBertForSequenceClassification(config))
    assert account.binary_params == 12 * (4 * 768 * 768 + 2 * 768 * 3072)
    assert account.binarized_layer_compression_ratio >= 30


def test_minilm_checkpoint(tmp_path):
    if not MINILM.is_dir():
        pytest.skip(f"{MINILM} is absent")
    model, info = SurgeBertForSequenceClassification.from_pretrained(MINILM, dtype=torch.float32,
                                                                     output_loading_info=True)
    surge_only = ("aux_weight", "input_threshold", "input_scale")
    assert {key for key in info["missing_keys"] if not key.endswith(surge_only)} == {
        "classifier.weight", "classifier.bias"}
    assert info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    with safe_open(MINILM / "model.safetensors", "pt") as handle:
        on_disk = {name.removeprefix("bert."): name for name in handle.keys()}
        for name, layer in model.named_modules():
            if isinstance(layer, SurgeLinear):
                key = on_disk[f"{name.removeprefix('bert.')}.weight"]
                assert torch.equal(layer.weight, handle.get_tensor(key).float()), name
                assert torch.equal(layer.aux_weight, layer.weight), name
    model.eval().save_pretrained(tmp_path / "packed", packed=True)
    BertForSequenceClassification.from_pretrained(MINILM, dtype=torch.float32).save_pretrained(tmp_path / "float32")
    packed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "packed")
    ids = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, model.finalize()(input_ids=ids).logits)
    packed_bytes = (tmp_path / "packed" / "model.safetensors").stat().st_size
    float32_bytes = (tmp_path / "float32" / "model.safetensors").stat().st_size
    assert float32_bytes / packed_bytes > 1.8  # the float embeddings (30522 x 384) dominate both files
    stored, float32 = binarized_layer_bytes(tmp_path / "packed", packed)
    assert float32 == 4 * 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert float32 / stored >= 30


# ------------------------------------------------------------------------------- binarize(plain model) and save
@pytest.mark.parametrize("packed", [False, True])
def test_binarized_plain_bert_saves_a_binary_checkpoint_that_loads_back(tmp_path, packed):
    torch.manual_seed(0)
    model = binarize(BertForSequenceClassification(plain_bert_config()), SurgeConfig(eta=0.2)).eval()
    assert type(model) is SurgeBertForSequenceClassification and type(model.config) is SurgeBertConfig
    assert model.config.surge_config == SurgeConfig(eta=0.2) and type(model.bert).__name__ == "SurgeBertModel"
    logits = model(input_ids=input_ids()).logits
    model.save_pretrained(tmp_path, packed=packed)
    assert json.loads((tmp_path / "config.json").read_text())["surge_packed"] is packed
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.get_submodule(LAYER), BinaryLinear if packed else SurgeLinear)
    assert loaded.config.surge_config == SurgeConfig(eta=0.2)
    assert torch.equal(loaded(input_ids=input_ids()).logits, logits)
