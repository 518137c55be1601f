"""The op layer itself: which implementation ``impl="auto"`` runs (ops.IMPL_DEFAULTS,
ops.resolve_impl) and the one table of op names and activation codes (read from the compiled
library). Each op family's numerics: tests/test_krylov.py, test_hvp.py, test_sketch.py."""
import pytest
import torch

import landscape_ext
from landscape_ext import _extension, ops, reference

FUSABLE = ["linear_grad_sketch", "linear_grad_project", "xent_hvp", "act_derivs"]


def test_impl_defaults_table():
    # the decisions bench/README.md records: every kernel on CPU; on CUDA the composite for
    # linear_grad_sketch until its kernel is measured there
    assert ops.IMPL_DEFAULTS == {
        "linear_grad_sketch": {"cpu": "fused", "cuda": "composite"},
        "linear_grad_project": {"cpu": "fused", "cuda": "fused"},
        "xent_hvp": {"cpu": "fused", "cuda": "fused"},
        "act_derivs": {"cpu": "fused", "cuda": "fused"},
    }


@pytest.mark.parametrize("op", FUSABLE)
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cuda", "cuda:0", "meta"])
def test_auto_follows_the_table_where_a_kernel_exists(op, device):
    kind = torch.device(device).type
    has_kernel = kind.upper() in landscape_ext.build_info()["kernels"][op]
    expected = ops.IMPL_DEFAULTS[op].get(kind, "composite") if has_kernel else "composite"
    assert ops.resolve_impl(op, device) == expected
    assert ops.resolve_impl(op, device, None) == expected
    assert ops.resolve_impl(op, device, "composite") == "composite"
    if kind == "cpu":
        assert expected == ops.IMPL_DEFAULTS[op]["cpu"] == "fused"
        assert ops.resolve_impl(op, device, "fused") == "fused"


def test_resolve_impl_errors():
    with pytest.raises(ValueError, match=r"resolve_impl: unknown op 'block_orthonormalize'; "
                                         r"one of \['act_derivs', "):
        ops.resolve_impl("block_orthonormalize", "cpu")
    with pytest.raises(ValueError, match=r"xent_hvp: impl must be 'auto', 'fused' or "
                                         r"'composite' \(None means 'auto'\), got 'kernel'"):
        ops.resolve_impl("xent_hvp", "cpu", "kernel")
    # no op has a kernel for the meta device: an explicit "fused" says so, "auto" falls back
    with pytest.raises(NotImplementedError, match=r"act_derivs: impl='fused' but this build has "
                                                  r"no act_derivs kernel for device type 'meta' "
                                                  r"\(kernels for: CPU"):
        ops.resolve_impl("act_derivs", "meta", "fused")
    assert ops.resolve_impl("act_derivs", "meta", "auto") == "composite"
    if not torch.cuda.is_available() and not landscape_ext.build_info()["cuda_kernels"]:
        with pytest.raises(NotImplementedError, match=r"no xent_hvp kernel for device type 'cuda'"):
            ops.resolve_impl("xent_hvp", "cuda", "fused")


def test_composite_path_compiles_fullgraph():
    z = torch.randn(5, 6)
    A, E, V = torch.randn(8, 5), torch.randn(8, 4), torch.randn(3, 4, 5)

    def step(z, A, E, V):
        a, d1, d2 = ops.act_derivs(z * 2.0, "gelu", impl="composite")
        y = ops.linear_grad_sketch(A, E, V, impl="composite")
        return a.sum() + d1.sum() + d2.sum() + y.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, A, E, V), step(z, A, E, V))


def test_op_names_are_the_registered_schemas():
    names = _extension.op_names()
    assert names == ("act_derivs", "block_orthonormalize", "linear_grad_project",
                     "linear_grad_sketch", "orthogonalize_batched", "xent_hvp")
    kernels = landscape_ext.build_info()["kernels"]
    assert tuple(kernels) == names and all("CPU" in keys for keys in kernels.values())
    assert set(ops.IMPL_DEFAULTS) <= set(names)


def test_activation_codes_come_from_the_compiled_table():
    assert ops.ACTIVATIONS == dict(landscape_ext._C.activations()) == {
        "identity": 0, "relu": 1, "gelu": 2, "tanh": 3, "silu": 4}
    z = torch.linspace(-3, 3, 13, dtype=torch.float64)
    for name, code in ops.ACTIVATIONS.items():
        by_name, by_code = reference.act_derivs(z, name), reference.act_derivs(z, code)
        assert all(torch.equal(a, b) for a, b in zip(by_name, by_code))
    # the kernel's message lists the same table
    with pytest.raises(RuntimeError, match=r"act = 5 is not an activation code \(0 identity, "
                                           r"1 relu, 2 gelu, 3 tanh, 4 silu\)"):
        ops.act_derivs(z, 5)
    with pytest.raises(ValueError, match=r"act_derivs: 5 is not an activation name or code"):
        ops.act_derivs(z, 5, impl="composite")
