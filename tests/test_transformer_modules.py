"""nn.MultiheadAttention / nn.TransformerEncoder(Layer): rebuilt from plain pieces, quantized, deployed.

The reference for the FP32 rebuild is PyTorch's own module (in eval mode, so its native fast path
where it takes it); the quantized model is checked against the float one and against ONNX Runtime.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixq
from mixq.errors import ModelError
from mixq.quant.modules import quant_layers
from mixq.quant.attention import DecomposedMultiheadAttention
from mixq.quant.transformer import (DecomposedDecoder, DecomposedDecoderLayer, DecomposedEncoder,
                                    DecomposedEncoderLayer, DecomposedTransformer, decompose_attention)
from mixq.verify import verify

D, HEADS, FF, LAYERS = 32, 4, 64, 2
LINEARS = [f"layers.{i}.{n}" for i in range(LAYERS)
           for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                     "linear1", "linear2")]


def encoder(batch_first: bool = True, norm_first: bool = False, activation: str = "relu", bias: bool = True,
            nested: bool = False, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.1, batch_first=batch_first, norm_first=norm_first,
                                       activation=activation, bias=bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ... norm_first"
        return nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=nested).eval()


def inputs(batch_first: bool, b: int = 3, length: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((b, length, D) if batch_first else (length, b, D), generator=g)
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 3:] = True
    causal = torch.triu(torch.full((length, length), float("-inf")), 1)
    return x, pad, causal


MASKS = {"none": lambda pad, causal: {},
         "key_padding": lambda pad, causal: {"src_key_padding_mask": pad},
         "float_causal": lambda pad, causal: {"mask": causal},
         "bool_causal_and_padding": lambda pad, causal: {"mask": torch.isinf(causal),
                                                         "src_key_padding_mask": pad}}


# ------------------------------------------------------------------------------------------- FP32 rebuild
@pytest.mark.parametrize("batch_first,norm_first,activation",
                         list(itertools.product([True, False], [False, True], ["relu", "gelu"])))
def test_rebuilt_encoder_computes_what_torch_computes(batch_first, norm_first, activation):
    enc = encoder(batch_first, norm_first, activation)
    rebuilt = decompose_attention(enc)
    assert type(rebuilt) is DecomposedEncoder and all(type(l) is DecomposedEncoderLayer for l in rebuilt.layers)
    assert type(enc) is nn.TransformerEncoder  # the original is left as it was
    x, pad, causal = inputs(batch_first)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: mismatched mask types are deprecated
        for name, masks in MASKS.items():
            ref, got = enc(x, **masks(pad, causal)), rebuilt(x, **masks(pad, causal))
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("bias", [True, False])
def test_rebuilt_layer_without_bias_and_with_nested_tensor_fast_path(bias):
    enc = encoder(bias=bias, nested=True)
    rebuilt = decompose_attention(enc)
    x, pad, _ = inputs(True)
    with torch.no_grad():
        ref, got = enc(x, src_key_padding_mask=pad), rebuilt(x, src_key_padding_mask=pad)
        kept = ~pad  # the nested-tensor fast path writes zeros at padded positions; the slow path computes them
        assert (got - ref)[kept].abs().max().item() < 1e-5
        layer = decompose_attention(enc.layers[0])  # a layer on its own
        assert (layer(x, src_key_padding_mask=pad) - enc.layers[0](x, src_key_padding_mask=pad)).abs().max() < 1e-5


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_rebuilt_multihead_attention_matches_torch(batch_first, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, bias=bias, batch_first=batch_first).eval()
    rebuilt = decompose_attention(mha)
    assert type(rebuilt) is DecomposedMultiheadAttention
    assert [n for n, _ in rebuilt.named_children()] == ["q_proj", "k_proj", "v_proj", "out_proj", "attn_dropout"]
    assert all(type(m) is nn.Linear for m in (rebuilt.q_proj, rebuilt.k_proj, rebuilt.v_proj, rebuilt.out_proj))
    x, pad, causal = inputs(batch_first, length=6)
    y, _, _ = inputs(batch_first, length=9, seed=3)  # cross attention: another source length
    b = 3
    mask3d = torch.randn(b * HEADS, 6, 6)
    with torch.no_grad():
        for args, kw in [((x, x, x), {"need_weights": False, "key_padding_mask": pad, "attn_mask": causal}),
                         ((x, x, x), {"attn_mask": mask3d}),
                         ((x, x, x), {"attn_mask": mask3d, "average_attn_weights": False}),
                         ((x, y, y), {"key_padding_mask": torch.rand(b, 9) > 0.7}),
                         ((x[:, 0] if batch_first else x[:, 0], x[:, 0], x[:, 0]), {})]:  # unbatched (L, E)
            (ref, ref_w), (got, got_w) = mha(*args, **kw), rebuilt(*args, **kw)
            assert got.shape == ref.shape and (got - ref).abs().max() < 1e-5, kw.keys()
            assert (ref_w is None) == (got_w is None)
            if ref_w is not None:
                assert got_w.shape == ref_w.shape and (got_w - ref_w).abs().max() < 1e-6


def test_key_and_value_of_their_own_sizes():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, HEADS, kdim=12, vdim=20, batch_first=True).eval()
    rebuilt = decompose_attention(mha)
    assert (rebuilt.k_proj.in_features, rebuilt.v_proj.in_features) == (12, 20)
    q, k, v = torch.randn(2, 5, D), torch.randn(2, 8, 12), torch.randn(2, 8, 20)
    with torch.no_grad():
        assert (rebuilt(q, k, v)[0] - mha(q, k, v)[0]).abs().max() < 1e-5


def test_attention_mixq_cannot_rebuild_is_refused_by_name_and_can_be_kept_float():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(D, HEADS, add_bias_kv=True, batch_first=True)
            self.fc = nn.Linear(D, 3)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    with pytest.raises(ModelError, match=r"nn.MultiheadAttention 'attn' uses add_bias_kv=True.*"
                                         r"custom_modules=\{nn.MultiheadAttention: None\}"):
        mixq.prepare(Net().eval())
    q = mixq.prepare(Net().eval(), custom_modules={nn.MultiheadAttention: None})
    assert list(q.mixq.kinds) == ["fc"]
    assert [l.name for l in q.mixq.left_float] == ["attn", "attn.out_proj"]
    assert all(l.by_design and "kept float as asked" in l.reason for l in q.mixq.left_float)


# ------------------------------------------------------------------------------------------- quantized
class Classifier(nn.Module):
    """An encoder over a padded batch, mean-pooled, and a linear head."""

    def __init__(self, batch_first: bool = True, norm_first: bool = False) -> None:
        super().__init__()
        self.encoder = encoder(batch_first, norm_first)
        torch.manual_seed(7)
        self.head = nn.Linear(D, 5)
        self.batch_first = batch_first

    def forward(self, x, pad):
        h = self.encoder(x, src_key_padding_mask=pad)
        return self.head(h.mean(1 if self.batch_first else 0))


def batches(n: int, batch_first: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn((16, 10, D) if batch_first else (10, 16, D), generator=g)
        pad = torch.zeros(16, 10, dtype=torch.bool)
        pad[::3, 7:] = True
        out.append((x, pad))
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("mode", ["fx", "module"])
@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_every_linear_of_the_encoder_is_quantized_and_the_output_moves_a_little(mode, batch_first, norm_first):
    model = Classifier(batch_first, norm_first).eval()
    calib = batches(4, batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FallbackWarning, no LeftFloatWarning, no QuantNotAppliedWarning
        q = mixq.quantize(model, "int8", calib_data=calib, mode=mode)
    st = q.mixq
    assert st.mode == mode and not st.not_run
    assert {"encoder", "encoder.layers.1", "encoder.layers.1.self_attn"} <= set(st.extra["decomposed"])
    linears = {u for u, k in st.kinds.items() if k == "linear"}
    assert linears == {f"encoder.{n}" for n in LINEARS} | {"head"}
    if mode == "fx":  # the attention products are units too, as in a hand-written BERT
        assert {f"encoder.layers.{i}.self_attn.{m}" for i in range(LAYERS) for m in ("matmul", "matmul_1")} <= set(st.kinds)
    assert st.realisation.complete and st.realisation.counts == {"int8": len(st.kinds)}
    assert st.coverage.quantized + st.coverage.left_float == st.coverage.model
    assert all(l.by_design for l in st.left_float)  # only the LayerNorms
    x, pad = batches(1, batch_first, seed=9)[0]
    with torch.no_grad():
        ref, out = model(x, pad), q(x, pad)
        assert not torch.equal(out, ref)
        assert cosine(out, ref) > 0.99
        # measured: cosine 0.99975 (fx) and 0.99979 (module) post-norm, 0.9973-0.9974 pre-norm seq-first
        with mixq.applied(q, "fp32"):
            assert (q(x, pad) - ref).abs().max() < 1e-5


def test_a_plan_keeping_one_projection_fp32_changes_only_that_unit():
    model = Classifier().eval()
    q = mixq.quantize(model, "int8", calib_data=batches(4))
    unit = "encoder.layers.0.self_attn.q_proj"
    x, pad = batches(1, seed=9)[0]
    with torch.no_grad():
        all_int8 = q(x, pad)
        before = {n: m.active_format for n, m in quant_layers(q)}
        mixq.set_plan(q, {"default": "int8", "layers": {unit: "fp32"}})
        after = {n: m.active_format for n, m in quant_layers(q)}
        partial = q(x, pad)
    assert {n for n in before if before[n] != after[n]} == {unit} and after[unit] == "fp32"
    assert not torch.equal(partial, all_int8)
    assert q.mixq.realisation.summary() == "int8 on 19 of 20 units; fp32 on 1 named in the plan"


def test_inventory_names_are_the_plan_names():
    model = Classifier().eval()
    inv = mixq.inventory(model, batches(1)[0])
    names = [l.name for l in inv]
    assert names[:8] == ["encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.k_proj",
                         "encoder.layers.0.self_attn.v_proj", "encoder.layers.0.self_attn.matmul",
                         "encoder.layers.0.self_attn.matmul_1", "encoder.layers.0.self_attn.out_proj",
                         "encoder.layers.0.linear1", "encoder.layers.0.linear2"]
    q_proj = inv[0]
    assert q_proj.params == D * D + D and q_proj.macs == 16 * 10 * D * D and q_proj.calls == 1
    assert all(l.calls == 1 for l in inv)


def balanced_classifier() -> Classifier:
    """The Classifier with its head standardized on pooled features: with random weights most samples
    fell in one class (3 of 5 classes seen), and top-1 agreement on one class agrees trivially."""
    model = Classifier().eval()
    feats = []
    hook = model.head.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    with torch.no_grad():
        for b in batches(8, seed=5):
            model(*b)
        f = torch.cat(feats)
        model.head.weight.div_(f.std(0).clamp_min(1e-6))
        model.head.bias.copy_(-(model.head.weight @ f.mean(0)))
    hook.remove()
    return model


def top1(outputs, targets):
    pred = torch.cat([o.float() for o in outputs]).argmax(1)
    return (pred == torch.cat(list(targets))).double().numpy() * 100.0


@pytest.mark.parametrize("backend,fmt", [("ort-cpu", "int8"), ("tensorrt", "int8"), ("tensorrt", "fp8_e4m3")])
def test_onnx_runtime_runs_the_quantized_encoder_as_the_simulation_does(backend, fmt):
    model = balanced_classifier()
    calib = batches(4)
    with torch.no_grad():
        evald = [(b, model(*b).argmax(1)) for b in batches(6, seed=3)]
    assert torch.cat([y for _, y in evald]).unique().numel() == 5  # else top-1 agreement agrees trivially
    q = mixq.quantize(model, fmt, backend=backend, calib_data=calib)
    assert q.mixq.realisation.complete
    res = verify(q, fmt, evald, top1)  # the padding mask is a second (bool) input of the ONNX graph
    assert res.passed, res.summary()
    assert res.engine.top1_agreement >= 0.995  # measured: 1.0 for all three
    if backend == "ort-cpu":  # every unit, the q/k/v/out projections included, runs as an integer kernel
        assert not res.kernels["units_float"] and len(res.kernels["units_integer"]) == len(q.mixq.kinds)


class SmallLayer(nn.TransformerEncoderLayer):
    """A subclass that only fixes the sizes: same forward, so it is rebuilt."""

    def __init__(self) -> None:
        super().__init__(D, HEADS, FF, dropout=0.0, batch_first=True)


class LoggedLayer(nn.TransformerEncoderLayer):
    """A subclass with a forward of its own (calling PyTorch's, fast path included): left as it is."""

    def __init__(self) -> None:
        super().__init__(D, HEADS, FF, dropout=0.0, batch_first=True)
        self.calls = 0

    def forward(self, src, *args, **kwargs):
        self.calls += 1
        return super().forward(src, *args, **kwargs)


def test_subclasses_are_rebuilt_only_when_they_keep_the_forward():
    torch.manual_seed(0)
    small = SmallLayer().eval()
    rebuilt = decompose_attention(small)
    assert type(rebuilt) is DecomposedEncoderLayer
    x = inputs(True)[0]
    with torch.no_grad():
        assert (rebuilt(x) - small(x)).abs().max() < 1e-5
    logged = nn.Sequential(LoggedLayer(), nn.Linear(D, 3)).eval()
    assert decompose_attention(logged) is logged  # nothing to rebuild: its attention stays with it
    # quantized as before: linear1/linear2 are swapped, the fast path skips them, and quantize says so
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FallbackWarning, LeftFloatWarning
        with pytest.raises(mixq.errors.QuantNotAppliedError, match=r"2 of the 3 unit\(s\).*'0.linear1', '0.linear2' "
                                                                   r"\(bypassed: LoggedLayer '0'"):
            mixq.quantize(logged, "int8", calib_data=[x], mode="module")


def test_a_saved_quantized_encoder_loads_with_the_same_units_and_outputs(tmp_path):
    model = Classifier().eval()
    calib = batches(3)
    q = mixq.quantize(model, "int8", calib_data=calib)
    mixq.save_quantized(q, tmp_path / "q")
    back = mixq.load_quantized(Classifier().eval(), tmp_path / "q", calib_data=calib)
    assert back.mixq.kinds == q.mixq.kinds
    x, pad = batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(back(x, pad), q(x, pad))


# ------------------------------------------------------------------------------------------- decoder, nn.Transformer
def transformer(batch_first: bool, norm_first: bool) -> nn.Transformer:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor with norm_first
        return nn.Transformer(D, HEADS, LAYERS, LAYERS, FF, dropout=0.1, batch_first=batch_first,
                              norm_first=norm_first).eval()


@pytest.mark.parametrize("batch_first,norm_first", list(itertools.product([True, False], [False, True])))
def test_rebuilt_transformer_computes_what_torch_computes(batch_first, norm_first):
    model = transformer(batch_first, norm_first)
    rebuilt = decompose_attention(model)
    assert type(rebuilt) is DecomposedTransformer and type(rebuilt.decoder) is DecomposedDecoder
    assert all(type(l) is DecomposedDecoderLayer for l in rebuilt.decoder.layers)
    assert type(rebuilt.decoder.layers[0].multihead_attn) is DecomposedMultiheadAttention
    src, src_pad, _ = inputs(batch_first, length=9)
    tgt, tgt_pad, causal = inputs(batch_first, length=6, seed=2)
    with torch.no_grad():
        for kw in [{}, {"tgt_mask": causal, "memory_key_padding_mask": src_pad},
                   {"tgt_mask": causal, "tgt_is_causal": True, "tgt_key_padding_mask": tgt_pad,
                    "src_key_padding_mask": src_pad, "memory_key_padding_mask": src_pad}]:
            ref, got = model(src, tgt, **kw), rebuilt(src, tgt, **kw)
            assert (got - ref).abs().max() < 1e-5, list(kw)


def test_every_linear_of_nn_transformer_is_quantized():
    class Seq2Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = transformer(True, False)

        def forward(self, src, tgt):
            return self.t(src, tgt, tgt_mask=torch.triu(torch.full((6, 6), float("-inf")), 1))

    model = Seq2Seq().eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(8, 9, D, generator=g), torch.randn(8, 6, D, generator=g)) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = mixq.quantize(model, "int8", calib_data=calib)
    linears = {u for u, k in q.mixq.kinds.items() if k == "linear"}
    attn = ("q_proj", "k_proj", "v_proj", "out_proj")
    expect = {f"t.encoder.{n}" for n in LINEARS} | {
        f"t.decoder.layers.{i}.{a}.{p}" for i in range(LAYERS) for a in ("self_attn", "multihead_attn") for p in attn} | {
        f"t.decoder.layers.{i}.linear{j}" for i in range(LAYERS) for j in (1, 2)}
    assert q.mixq.mode == "fx" and linears == expect and q.mixq.realisation.complete
    src, tgt = calib[0]
    with torch.no_grad():
        ref, out = model(src, tgt), q(src, tgt)
    assert not torch.equal(out, ref) and cosine(out, ref) > 0.99  # measured: 0.9995
