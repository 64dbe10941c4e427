"""The Registry type: registration, wildcard listing, suggestions on a miss."""

from __future__ import annotations

import pytest

from zoo.errors import UnknownNameError, ZooError
from zoo.registry import MODELS, RECIPES, Registry


def test_register_build_and_meta():
    reg = Registry("widget")

    @reg.register("small_widget", size=3)
    def make(scale=1):
        return ("widget", scale)

    assert reg.build("small_widget", scale=2) == ("widget", 2)
    assert reg.get("small_widget").meta == {"size": 3}
    assert "small_widget" in reg and len(reg) == 1


def test_register_same_name_twice_is_an_error():
    reg = Registry("widget")
    reg.register("a", lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", lambda: 2)


def test_wildcard_and_substring_listing():
    reg = Registry("widget")
    for n in ["vit_tiny_patch4_32", "vit_small_patch4_32", "vit_base_patch16_224", "resnet18"]:
        reg.register(n, lambda: None)
    assert reg.names("vit_*_patch4_*") == ["vit_small_patch4_32", "vit_tiny_patch4_32"]
    assert reg.names("patch16") == ["vit_base_patch16_224"]
    assert reg.names() == sorted(reg.names())


def test_miss_suggests_closest_names():
    reg = Registry("widget")
    for n in ["vit_tiny_patch4_32", "vit_small_patch4_32", "resnet18"]:
        reg.register(n, lambda: None)
    with pytest.raises(UnknownNameError) as e:
        reg.get("vit_tiny_patch4_23")
    assert isinstance(e.value, ZooError)
    msg = str(e.value)
    assert "unknown widget 'vit_tiny_patch4_23'" in msg and "vit_tiny_patch4_32" in msg
    assert "resnet18" not in msg.split("did you mean:")[1].split("?")[0]


def test_model_registry_is_not_vit_only():
    families = {e.meta["family"] for e in MODELS}
    assert {"vit", "resnet"} <= families
    assert RECIPES.kind == "recipe"
