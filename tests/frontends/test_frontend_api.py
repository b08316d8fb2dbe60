"""import_torch_model's contract: outputs, input specs, attention sources, errors."""

from __future__ import annotations

import json

import pytest
import torch
from attnforge.frontends import (
    FrontendError,
    ImportedModel,
    UnsupportedOpError,
    import_torch_model,
    unflatten_outputs,
)
from torch.utils import _pytree
from tvm import relax

from attnforge.models import build_hf_model


def test_attention_sources_gpt2_and_main_signature():
    model, inputs = build_hf_model("gpt2", batch=1, seq_len=16, attn_implementation="eager")
    imp = import_torch_model(model, inputs)
    assert isinstance(imp, ImportedModel)
    assert imp.attention_sources == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert imp.input_specs == [{"name": "input_ids", "shape": (1, 16), "dtype": "int64"}]
    main = imp.mod["main"]
    assert len(main.params) == 1  # weights are bound constants
    assert isinstance(imp.exported_program, torch.export.ExportedProgram)
    assert isinstance(main.ret_ty, relax.TupleType)  # a flat tuple, even for one output


def test_output_spec_and_desc_round_trip_hf_model_output(fe):
    model, inputs = build_hf_model("llama", batch=1, seq_len=16, attn_implementation="sdpa")
    imp = import_torch_model(model, inputs)
    flat = fe.build_and_run(imp.mod, *inputs)
    with torch.no_grad():
        ref = model(*inputs)
    rebuilt = _pytree.tree_unflatten([torch.from_numpy(a) for a in flat], imp.output_spec)
    assert type(rebuilt) is type(ref)
    assert torch.allclose(rebuilt.logits, ref.logits, rtol=1e-4, atol=1e-5)
    desc = json.loads(json.dumps(imp.output_desc))  # JSON-serialisable
    assert desc["kind"] == "dict" and desc["keys"] == ["logits"]
    assert desc["type"] == "CausalLMOutputWithPast"
    plain = unflatten_outputs(desc, flat)
    assert list(plain) == ["logits"] and plain["logits"].shape == tuple(ref.logits.shape)
    spec = _pytree.treespec_loads(desc["treespec"])
    assert spec == imp.output_spec


class TupleModel(torch.nn.Module):
    def forward(self, x, y):
        return (x + y, [x * 2, {"m": x.mean(-1)}]), x.sum()


def test_output_spec_and_desc_round_trip_tuple(fe):
    model = TupleModel()
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    imp = import_torch_model(model, (x, y))
    assert [s["name"] for s in imp.input_specs] == ["x", "y"]
    flat = fe.build_and_run(imp.mod, x, y)
    assert len(flat) == 4
    ref = model(x, y)
    rebuilt = _pytree.tree_unflatten([torch.from_numpy(a) for a in flat], imp.output_spec)
    for got, want in zip(_pytree.tree_leaves(rebuilt), _pytree.tree_leaves(ref), strict=True):
        assert torch.allclose(got, want, atol=1e-6)
    desc = imp.output_desc
    assert desc["kind"] == "tuple" and desc["n"] == 2 and desc["n_leaves"] == 4
    plain = unflatten_outputs(desc, flat)
    assert isinstance(plain, tuple) and isinstance(plain[0][1], list)
    assert set(plain[0][1][1]) == {"m"}
    single = import_torch_model(torch.nn.Tanh(), (x,))
    assert single.output_desc["kind"] == "tensor"
    assert len(fe.build_and_run(single.mod, x)) == 1  # still a (1-)tuple


def test_kwargs_inputs(fe):
    model = TupleModel()
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    imp = import_torch_model(model, (x,), example_kwargs={"y": y})
    assert [s["name"] for s in imp.input_specs] == ["x", "y"]
    assert len(fe.build_and_run(imp.mod, x, y)) == 4


class Bessel(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x) + 1


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), Bessel())

    def forward(self, x):
        return self.encoder(x)


def test_unsupported_op_names_op_and_module():
    with pytest.raises(UnsupportedOpError) as e:
        import_torch_model(Net(), (torch.randn(2, 4),))
    msg = str(e.value)
    assert "aten.special_bessel_j0.default" in msg
    assert "encoder.1" in msg and "Bessel" in msg
    assert "custom_convert_map" in msg
    assert e.value.op == "aten.special_bessel_j0.default"
    assert isinstance(e.value, FrontendError)


def test_unsupported_op_fixed_by_custom_converter(fe):
    def bessel_as_cos(node, importer):  # not bessel: only proves the hook is used
        return importer.block_builder.emit(relax.op.cos(importer.env[node.args[0]]))

    imp = import_torch_model(Net(), (torch.randn(2, 4),),
                             custom_convert_map={"special_bessel_j0.default": bessel_as_cos})
    assert "R.cos" in imp.mod.script()


@pytest.mark.parametrize("bad", [3, None, "x", [torch.randn(2)]])
def test_non_tensor_input_is_frontend_error(bad):
    with pytest.raises(FrontendError, match=r"example_inputs\[1\].*only tensors"):
        import_torch_model(TupleModel(), (torch.randn(2, 3), bad))


def test_not_a_module_and_export_failure_are_frontend_errors():
    with pytest.raises(FrontendError, match="torch.nn.Module"):
        import_torch_model(lambda x: x, (torch.randn(2),))

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(FrontendError, match="torch.export failed"):
        import_torch_model(DataDependent(), (torch.randn(3),))


def test_training_mode_restored():
    model = torch.nn.Dropout(0.5)
    model.train()
    imp = import_torch_model(model, (torch.randn(4),))
    assert model.training
    assert imp.attention_sources == []
