"""What @node derives from a typed function: inputs, outputs, constraints, schema, cache tier."""

from __future__ import annotations

import jsonschema
import pytest

from graph import CONDITIONING, LATENT, MODEL, Boolean, Choice, Float, Int, String, node, socket_type
from graph.declare import NODE_REGISTRY
from graph.schema import schema_with_nodes, workflow_schema


@node(category="sampling", version=3)
def DemoSampler(model: MODEL, positive: CONDITIONING, latent: LATENT, mask: LATENT = None,
                seed: Int(0, 2**64 - 1) = 0, cfg: Float(0.0, 100.0) = 8.0,
                sampler_name: Choice(["euler", "ddim"]) = "euler", tiled: Boolean() = False,
                note: str = "", ctx=None) -> LATENT:
    """Denoise a latent.

    Longer description."""
    return latent


def test_inputs_outputs_and_flags_are_derived():
    spec = NODE_REGISTRY["DemoSampler"]
    assert list(spec.inputs) == ["model", "positive", "latent", "mask", "seed", "cfg", "sampler_name",
                                 "tiled", "note"]
    assert [n for n, i in spec.inputs.items() if i.required] == ["model", "positive", "latent"]
    assert spec.inputs["mask"].is_socket and not spec.inputs["mask"].required
    assert spec.inputs["seed"].type_name == "INT" and spec.inputs["seed"].default == 0
    assert isinstance(spec.inputs["note"].type, String)
    assert [(o.name, o.type.name) for o in spec.outputs] == [("LATENT", "LATENT")]
    assert spec.wants_ctx and spec.version == 3 and spec.category == "sampling"
    assert spec.title == "Denoise a latent."


def test_title_is_the_first_sentence_even_when_wrapped():
    @node(outputs=(LATENT,))
    def DemoWrapped(latent: LATENT):
        """Resize latents to a size (in pixels,
        divided by 8). A size of 0 keeps the aspect.

        More."""
        return latent

    assert NODE_REGISTRY["DemoWrapped"].title == "Resize latents to a size (in pixels, divided by 8)."


def test_cache_tier_follows_serializers_registered_later():
    socket_type("DEMO_LATER")

    @node(outputs=("DEMO_LATER",))
    def DemoLater():
        return 1

    spec = NODE_REGISTRY["DemoLater"]
    assert spec.cache_tier == "memory"
    socket_type("DEMO_LATER", to_bytes=lambda v: b"", from_bytes=lambda b: 1)
    assert spec.cache_tier == "disk"


def test_literal_constraints_check_and_parse():
    assert Int(0, 10).check(3) == 3 and Int().check(4.0) == 4
    with pytest.raises(ValueError, match="above the maximum 10"):
        Int(0, 10).check(11)
    with pytest.raises(ValueError, match="expected an integer"):
        Int().check(True)
    assert Float(0.0, 1.0).parse("0.5") == 0.5
    with pytest.raises(ValueError, match="below the minimum 0.0"):
        Float(0.0, 1.0).parse("-1")
    assert String().parse("a, b: c") == "a, b: c"  # prompts are verbatim
    assert Boolean().parse("true") is True
    with pytest.raises(ValueError, match="did you mean 'euler'"):
        Choice(["euler", "ddim"]).check("eulr")


def test_bad_declarations_fail_at_import():
    with pytest.raises(TypeError, match="needs a socket or literal annotation"):
        @node
        def NoAnnotation(x):
            return x
    with pytest.raises(ValueError, match="above the maximum"):
        @node
        def BadDefault(x: Int(0, 1) = 5):
            return x
    with pytest.raises(TypeError, match="not a literal input"):
        @node(reads_files={"model": lambda v, f: v})
        def BadFiles(model: MODEL):
            return model
    with pytest.raises(TypeError, match="cannot be named 'type'"):
        @node
        def TypeInput(type: str = "x"):
            return type
    with pytest.raises(TypeError, match="unknown output type"):
        @node(outputs=("NOPE",))
        def BadOutput():
            return 1


def test_schemas_are_valid_and_describe_node_inputs():
    jsonschema.Draft202012Validator.check_schema(workflow_schema())
    full = schema_with_nodes([NODE_REGISTRY["DemoSampler"]])
    jsonschema.Draft202012Validator.check_schema(full)
    good = {"nodes": {"s": {"type": "DemoSampler", "model": {"from": "m.MODEL"}, "positive": {"from": "p.0"},
                            "latent": {"from": "l.LATENT"}, "cfg": 7.5, "seed": "$seed"}}}
    jsonschema.validate(good, full)
    bad = {"nodes": {"s": {"type": "DemoSampler", "model": {"from": "m.MODEL"}, "positive": {"from": "p.0"},
                           "latent": {"from": "l.LATENT"}, "cfg": 700}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, full)
