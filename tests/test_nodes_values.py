"""Socket values: exact disk round-trips, and recipes that stack patches without touching weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from graph.types import SOCKET_TYPES
from nodes.values import ClipRecipe, Conditioning, FileRef, Latent, ModelRecipe


def _same(a, b) -> bool:
    return a is None and b is None or (a.dtype == b.dtype and np.array_equal(np.array(a), np.array(b)))


@pytest.mark.parametrize("type_name", ["CONDITIONING", "LATENT", "IMAGE", "MASK"])
def test_array_sockets_round_trip_exactly(type_name):
    rng = np.random.default_rng(0)
    arr = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    value = {
        "CONDITIONING": Conditioning(arr(1, 154, 64), arr(1, 64)),
        "LATENT": Latent(arr(2, 8, 8, 4), batch_index=(3, 4), noise_mask=arr(2, 64, 64)),
        "IMAGE": mx.array(rng.random((2, 16, 16, 3), dtype=np.float32)),
        "MASK": mx.array(rng.random((1, 16, 16), dtype=np.float32)),
    }[type_name]
    st = SOCKET_TYPES[type_name]
    blob = st.to_bytes(value)
    back = st.from_bytes(blob)
    assert st.to_bytes(back) == blob  # deterministic bytes
    if type_name == "CONDITIONING":
        assert _same(back.cond, value.cond) and _same(back.pooled, value.pooled)
    elif type_name == "LATENT":
        assert _same(back.samples, value.samples) and _same(back.noise_mask, value.noise_mask)
        assert back.batch_index == (3, 4)
    else:
        assert _same(back, value)


def test_optional_fields_stay_absent():
    st = SOCKET_TYPES["LATENT"]
    latent = st.from_bytes(st.to_bytes(Latent(mx.zeros((1, 2, 2, 4)))))
    assert latent.batch_index is None and latent.noise_mask is None
    cond = SOCKET_TYPES["CONDITIONING"].from_bytes(SOCKET_TYPES["CONDITIONING"].to_bytes(
        Conditioning(mx.ones((1, 77, 8)))))
    assert cond.pooled is None


def test_recipes_stack_patches_and_zero_strength_is_identity(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"m")
    (tmp_path / "a.safetensors").write_bytes(b"a")
    (tmp_path / "b.safetensors").write_bytes(b"b")
    ckpt, a, b = (FileRef.of(tmp_path / n) for n in ("m.safetensors", "a.safetensors", "b.safetensors"))
    base = ModelRecipe(ckpt)
    chained = base.with_lora(a, 0.8).with_lora(b, -0.5)
    patches = [(p.lora.name, p.strength) for p in chained.patches]
    assert patches == [("a.safetensors", 0.8), ("b.safetensors", -0.5)]
    assert base.patches == ()  # immutable: the base recipe is untouched
    assert base.with_lora(a, 0.0) == base
    assert hash(chained) == hash(ModelRecipe(ckpt).with_lora(a, 0.8).with_lora(b, -0.5))
    assert ClipRecipe(ckpt).with_lora(a, 1.0).stop_at_layer == -1


def test_conditioning_entries_and_options_round_trip():
    from nodes.values import CondEntry, register_option_codec

    class Recipe:  # a stand-in for a non-JSON option value (a ControlNet recipe, say)
        def __init__(self, name, image):
            self.name, self.image = name, image

    register_option_codec("test_recipe", lambda r: ({"name": r.name}, {"image": r.image}),
                          lambda data, arrays: Recipe(data["name"], arrays["image"]))
    rng = np.random.default_rng(1)
    arr = lambda *s: mx.array(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    value = Conditioning(entries=[
        CondEntry(arr(1, 77, 8), arr(1, 8)),
        CondEntry(arr(1, 154, 8), None, {"area": (8, 16, 0, 4), "strength": 0.5, "mask": arr(1, 4, 4),
                                         "set_area_to_bounds": False, "start_percent": 0.2,
                                         "test_recipe": Recipe("cn", arr(1, 4, 4, 3))}),
        CondEntry(arr(1, 77, 8), arr(1, 8), {"area": ("percentage", 0.5, 0.5, 0.0, 0.25)}),
    ])
    st = SOCKET_TYPES["CONDITIONING"]
    blob = st.to_bytes(value)
    back = st.from_bytes(blob)
    assert st.to_bytes(back) == blob and len(back) == 3
    for a, b in zip(value, back, strict=True):
        assert _same(a.cond, b.cond) and _same(a.pooled, b.pooled)
        assert set(a.options) == set(b.options)
    opts = back.entries[1].options
    assert opts["area"] == (8, 16, 0, 4) and opts["strength"] == 0.5
    assert _same(opts["mask"], value.entries[1].options["mask"]) and opts["test_recipe"].name == "cn"
    assert back.entries[2].options["area"] == ("percentage", 0.5, 0.5, 0.0, 0.25)
    with pytest.raises(TypeError):
        opts["strength"] = 1.0  # read-only
    with pytest.raises(ValueError, match="no disk codec"):
        st.to_bytes(value.with_options(other=object()))


def test_conditioning_blobs_from_before_entries_still_load():
    from nodes.values import _npz

    old = _npz({"cond": mx.ones((1, 77, 8)), "pooled": mx.zeros((1, 8))})
    back = SOCKET_TYPES["CONDITIONING"].from_bytes(old)
    assert len(back) == 1 and back.cond.shape == (1, 77, 8) and dict(back.entries[0].options) == {}
