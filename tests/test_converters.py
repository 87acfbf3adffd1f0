"""Weight converters: PyTorch, Keras, ONNX. Round trips are bit-exact; peers' outputs match."""
import numpy as np
import pytest

import nblstm
from helpers import relative_error

#: The issue's bar: nblstm vs PyTorch with packed sequences, float64.
TORCH_TOLERANCE = 1e-9


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_packed_sequences_match(bidirectional):
    torch = pytest.importorskip("torch")
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    torch.manual_seed(0)
    steps, batch, inputs, hidden, layers = 7, 5, 3, 6, 3
    module = torch.nn.LSTM(inputs, hidden, layers, bidirectional=bidirectional,
                           dtype=torch.float64)
    rng = np.random.default_rng(0)
    lengths = np.array([7, 3, 5, 1, 6])
    x = rng.standard_normal((steps, batch, inputs))
    n_states = layers * (2 if bidirectional else 1)
    h0, c0 = rng.standard_normal((2, n_states, batch, hidden))
    x_torch = torch.from_numpy(x).requires_grad_(True)
    h0_torch = torch.from_numpy(h0).requires_grad_(True)
    packed = pack_padded_sequence(x_torch, torch.from_numpy(lengths), enforce_sorted=False)
    y_packed, (h_n, c_n) = module(packed, (h0_torch, torch.from_numpy(c0)))
    y_torch, _ = pad_packed_sequence(y_packed, total_length=steps)
    dy = rng.standard_normal(tuple(y_torch.shape))
    dh = rng.standard_normal(tuple(h_n.shape))
    ((y_torch * torch.from_numpy(dy)).sum() + (h_n * torch.from_numpy(dh)).sum()).backward()

    for backend in ["numpy", "cpu"]:
        lstm = nblstm.LSTM.from_torch(module, backend=backend)
        y, (h, c) = lstm.forward(x, state=(h0, c0), lengths=lengths)
        dx, (dh0, _) = lstm.backward(dy, (dh, None))
        pairs = {"y": (y, y_torch), "h_n": (h, h_n), "c_n": (c, c_n), "dx": (dx, x_torch.grad),
                 "dh0": (dh0, h0_torch.grad)}
        for layer in range(layers):
            for d, suffix in enumerate(["", "_reverse"][:lstm.directions]):
                grads = lstm.grads[layer][d]
                name = f"_l{layer}{suffix}"
                pairs[f"W_h{name}"] = (grads.W_h.T, getattr(module, "weight_hh" + name).grad)
                pairs[f"W_x{name}"] = (grads.W_x.T, getattr(module, "weight_ih" + name).grad)
                pairs[f"b{name}"] = (grads.b, getattr(module, "bias_ih" + name).grad)
        for name, (ours, theirs) in pairs.items():
            error = relative_error(ours, theirs.detach().numpy())
            assert error < TORCH_TOLERANCE, f"{backend} {name}: {error:.1e}"


def test_torch_round_trip_is_bit_exact():
    pytest.importorskip("torch")
    lstm = nblstm.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25,
                       dtype=np.float32, rng=0)
    back = nblstm.LSTM.from_torch(lstm.to_torch())
    assert (back.batch_first, back.dropout, back.num_layers, back.bidirectional) == (
        True, 0.25, 2, True)
    for ours, theirs in zip(lstm.state_dict().values(), back.state_dict().values()):
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype


def test_torch_without_bias_and_with_projections():
    torch = pytest.importorskip("torch")
    module = torch.nn.LSTM(3, 4, bias=False)
    lstm = nblstm.LSTM.from_torch(module)
    assert not lstm.params[0][0].b.any()
    x = np.random.default_rng(1).standard_normal((5, 2, 3)).astype(np.float32)
    with torch.inference_mode():
        expected, _ = module(torch.from_numpy(x))
    assert relative_error(lstm.forward(x, training=False)[0], expected.numpy()) < 1e-5
    with pytest.raises(ValueError, match="proj_size"):
        nblstm.LSTM.from_torch(torch.nn.LSTM(3, 4, proj_size=2))


def test_keras_weights_give_the_layer_with_those_weights():
    rng = np.random.default_rng(2)
    kernel, recurrent, bias = (rng.standard_normal(shape) for shape in ((3, 16), (4, 16), (16,)))
    lstm = nblstm.LSTM.from_keras_weights(kernel, recurrent, bias)
    x = rng.standard_normal((4, 2, 3))
    expected, _, _ = nblstm.forward(x, nblstm.LSTMParams(W_x=kernel, W_h=recurrent, b=bias),
                                    backend="numpy")
    y, _ = lstm.forward(x)
    assert lstm.dtype == np.float64
    assert relative_error(y, expected) < 1e-14


@pytest.mark.parametrize("bidirectional", [False, True])
def test_onnx_round_trip_is_bit_exact(bidirectional):
    lstm = nblstm.LSTM(3, 5, bidirectional=bidirectional, dtype=np.float64, rng=4)
    w, r, b = lstm.to_onnx_weights()
    directions = 2 if bidirectional else 1
    assert w.shape == (directions, 20, 3) and r.shape == (directions, 20, 5)
    assert b.shape == (directions, 40)
    back = nblstm.LSTM.from_onnx_weights(w, r, b)
    for ours, theirs in zip(lstm.state_dict().values(), back.state_dict().values()):
        np.testing.assert_array_equal(ours, theirs)


def test_onnx_gate_order_is_i_o_f_c():
    hidden = 2
    blocks = {name: np.full((hidden, 1), value) for name, value in
              (("i", 1.0), ("o", 2.0), ("f", 3.0), ("c", 4.0))}
    w = np.concatenate([blocks[k] for k in "iofc"])[None]
    lstm = nblstm.LSTM.from_onnx_weights(w, np.zeros((1, 4 * hidden, hidden)))
    np.testing.assert_array_equal(lstm.params[0][0].W_x[0], np.repeat([1.0, 3.0, 4.0, 2.0], hidden))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_onnx_reference_evaluator_agrees(bidirectional):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    lstm = nblstm.LSTM(3, 4, bidirectional=bidirectional, dtype=np.float32, rng=6)
    w, r, b = lstm.to_onnx_weights()
    b = b + np.random.default_rng(0).standard_normal(b.shape).astype(np.float32)
    directions = 2 if bidirectional else 1
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["Y", "Y_h", "Y_c"], hidden_size=4,
                            direction="bidirectional" if bidirectional else "forward")
    graph = helper.make_graph(
        [node], "lstm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "XWRB"],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h", "Y_c")])
    model = helper.make_model(graph)
    x = np.random.default_rng(7).standard_normal((5, 2, 3)).astype(np.float32)
    y_onnx, h_onnx, _ = ReferenceEvaluator(model).run(None, {"X": x, "W": w, "R": r, "B": b})
    converted = nblstm.LSTM.from_onnx_weights(w, r, b)
    y, (h, _) = converted.forward(x, training=False)
    # ONNX's Y is (T, D, B, H); nblstm concatenates directions on the feature axis.
    expected = y_onnx.transpose(0, 2, 1, 3).reshape(5, 2, directions * 4)
    assert relative_error(y, expected) < 1e-5
    assert relative_error(h, h_onnx) < 1e-5
