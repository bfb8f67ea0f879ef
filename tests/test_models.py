"""Backbones: padding equivalence, LoRA step-0 identity, target modules, load errors."""

import copy

import pytest
import torch

from rankwise.errors import ModelLoadError
from rankwise.methods.targets import resolve_target_modules
from rankwise.models import load_backbone


@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-deberta"])
def test_masked_padding_does_not_change_outputs(alias):
    torch.manual_seed(0)
    model, tok = load_backbone(alias, num_labels=3)
    model.eval()
    texts = [("the movie is good", "it was"), ("a", "bad movie and not good of the movie in it")]
    with torch.no_grad():
        alone = [model(**tok(a, b, return_tensors="pt")).logits for a, b in texts]
        padded = tok([a for a, _ in texts], [b for _, b in texts], padding="longest", return_tensors="pt")
        assert padded["attention_mask"].sum(1).min() < padded["attention_mask"].shape[1]  # really padded
        together = model(**padded).logits
        longer = tok([a for a, _ in texts], [b for _, b in texts], padding="max_length", max_length=40,
                     return_tensors="pt")
        maxlen = model(**longer).logits
    for i in range(2):
        torch.testing.assert_close(together[i], alone[i][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(maxlen[i], alone[i][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alias,n", [("tiny-bert", 12), ("tiny-deberta", 12)])
def test_default_targets_cover_six_matrices_per_layer(alias, n):
    model, _ = load_backbone(alias, num_labels=2)
    names = resolve_target_modules(model)
    assert len(names) == n
    kinds = {name.split("layer.0.")[-1] for name in names if ".layer.0." in name}
    assert len(kinds) == 6


def test_targets_override_and_no_match():
    model, _ = load_backbone("tiny-bert", num_labels=2)
    assert all(n.endswith("query") for n in resolve_target_modules(model, ["query"]))
    with pytest.raises(ValueError, match="match no"):
        resolve_target_modules(model, ["nonexistent_proj"])


@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-deberta"])
def test_lora_step0_logits_equal_backbone(alias):
    from rankwise.methods.lora import LoRA, LoRAConfig

    torch.manual_seed(0)
    backbone, tok = load_backbone(alias, num_labels=2)
    reference = copy.deepcopy(backbone).eval()
    model = LoRA(LoRAConfig(rank=4), None).wrap(backbone, resolve_target_modules(backbone)).eval()
    batch = tok(["the movie is good", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    assert not any("query.base_layer.weight" in n for n in trainable)


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_backbone(str(tmp_path / "nope"), num_labels=2)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="model.name"):
        load_backbone("nobody-has/this-model-xyz", num_labels=2)
