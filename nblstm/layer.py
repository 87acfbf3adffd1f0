"""``nblstm.LSTM``: a multi-layer, optionally bidirectional LSTM for NumPy pipelines."""
import numpy as np

from . import api
from ._device import is_device_array
from ._validation import check_array, check_float_dtype
from .params import N_GATES, LSTMParams

#: ONNX stacks gates as i, o, f, c; nblstm as i, f, g(=c), o. ONNX_ORDER[k] is
#: the ONNX block holding nblstm's gate k.
ONNX_ORDER = (0, 2, 3, 1)
#: The inverse: NBLSTM_ORDER[k] is the nblstm block holding ONNX's gate k.
NBLSTM_ORDER = (0, 3, 1, 2)


def _torch_name(name, layer, direction):
    """PyTorch's attribute name, e.g. ``weight_hh_l1_reverse``."""
    return f"{name}_l{layer}" + ("_reverse" if direction == 1 else "")


def _reorder_gates(array, order, axis):
    """Permute the four gate blocks of ``array`` along ``axis``."""
    blocks = np.split(array, N_GATES, axis=axis)
    return np.concatenate([blocks[k] for k in order], axis=axis)


class LSTM:
    """A stack of LSTM layers, each unidirectional or bidirectional, as in ``torch.nn.LSTM``.

    Parameters
    ----------
    input_size, hidden_size : int
        I and H.
    num_layers : int
        Layer l+1 reads layer l's output (D*H features).
    bidirectional : bool
        Add a reverse direction per layer; outputs are concatenated (D = 2).
    batch_first : bool
        x and y are (B, T, ·) instead of (T, B, ·).
    dropout : float
        Inverted dropout on every layer's output except the last, in training.
    dtype : float32 or float64
    backend : {"auto", "numpy", "cpu", "cuda"}
    rng : numpy.random.Generator, int or None
        Source of the initial weights and of the dropout masks.

    Attributes
    ----------
    params : list of list of LSTMParams
        ``params[l][d]``: layer l, direction d (d = 1 is the reverse direction).
    grads : list of list of LSTMParams or None
        The gradients of the last :meth:`backward`, same structure.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bidirectional=False,
                 batch_first=False, dropout=0.0, dtype=np.float32, backend="auto", rng=None):
        if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if backend not in api.BACKEND_NAMES:
            raise ValueError(f"backend must be one of {api.BACKEND_NAMES}, got {backend!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = int(num_layers)
        self.directions = 2 if bidirectional else 1
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.backend = backend
        self.rng = np.random.default_rng(rng)
        self.params = [[LSTMParams.init(self._layer_input_size(layer), hidden_size, dtype=dtype,
                                        rng=self.rng) for _ in range(self.directions)]
                       for layer in range(self.num_layers)]
        self.grads = None
        self._saved = None

    @property
    def bidirectional(self):
        """Whether each layer has a reverse direction."""
        return self.directions == 2

    @property
    def dtype(self):
        """The parameters' dtype."""
        return self.params[0][0].dtype

    def _layer_input_size(self, layer):
        return self.input_size if layer == 0 else self.directions * self.hidden_size

    def _state_shape(self, batch):
        return (self.num_layers * self.directions, batch, self.hidden_size)

    def _check_states(self, impl, pair, name, batch):
        if pair is None:
            return None, None
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{name} must be a pair (h, c) of (L*D, B, H) arrays or None")
        shape = self._state_shape(batch)
        return tuple(api.check_state(impl, value, f"{name}[{k}]", shape, self.dtype,
                                     "(num_layers * num_directions, B, H)")
                     for k, value in enumerate(pair))

    def _dropout_mask(self, shape):
        keep = self.rng.random(shape) >= self.dropout
        return (keep / (1 - self.dropout)).astype(self.dtype)

    def forward(self, x, state=None, lengths=None, training=True):
        """Run every layer over a batch of sequences.

        Parameters
        ----------
        x : (T, B, I) array, or (B, T, I) when ``batch_first``
        state : (h0, c0) or None
            Each (num_layers * num_directions, B, H); zeros when None.
        lengths : (B,) integer array or None
            Valid steps per sequence, 0 <= lengths[b] <= T, any order: no
            sorting or packing needed. Padded outputs are zero.
        training : bool
            Save what :meth:`backward` needs, and apply dropout.

        Returns
        -------
        y : (T, B, D*H) array, or (B, T, D*H) when ``batch_first``
        (h_n, c_n) : two (num_layers * num_directions, B, H) arrays
            Each sequence's state after its last valid step; index
            ``l * D + d`` is layer l, direction d.
        """
        impl = api.resolve_backend(self.backend, x)
        to_host = not is_device_array(x)
        layer_input = api.check_input(impl, x, self.input_size, self.dtype, self.batch_first)
        steps, batch = layer_input.shape[:2]
        h0, c0 = self._check_states(impl, state, "state", batch)
        host_lengths = api.check_lengths(lengths, batch, steps)
        n_dirs = self.directions
        caches, masks, h_n, c_n = [], [], [], []
        for layer in range(self.num_layers):
            rows = slice(layer * n_dirs, (layer + 1) * n_dirs)
            y, h_layer, c_layer, cache = api.forward_layer(
                impl, layer_input, impl.params(self.params[layer]),
                None if h0 is None else h0[rows], None if c0 is None else c0[rows],
                host_lengths, training)
            caches.append(cache)
            h_n.append(h_layer)
            c_n.append(c_layer)
            if training and self.dropout > 0 and layer < self.num_layers - 1:
                mask = self._dropout_mask(tuple(y.shape))
                impl.scale(y, mask)
                masks.append(mask)
            layer_input = y
        if self.batch_first:
            layer_input = impl.batch_major(layer_input)
        y, h_n, c_n = impl.hand_back([layer_input, impl.stack(h_n), impl.stack(c_n)], to_host)
        self._saved = (impl.name, caches, masks, to_host, batch) if training else None
        return y, (h_n, c_n)

    def backward(self, dy, d_state=None):
        """Backpropagate the last training-mode :meth:`forward`.

        Parameters
        ----------
        dy : (T, B, D*H) array (or (B, T, D*H) when ``batch_first``) or None
            Gradient of the loss with respect to y (ignored at padding).
        d_state : (dh_n, dc_n) or None
            Gradients with respect to the final states, each
            (num_layers * num_directions, B, H).

        Returns
        -------
        dx : array shaped like x
        (dh0, dc0) : two (num_layers * num_directions, B, H) arrays
            Zeros where forward was given no state.

        The parameter gradients overwrite :attr:`grads`; calling backward
        again with the same arguments gives the same results.
        """
        if self._saved is None:
            raise RuntimeError("backward needs a preceding forward(..., training=True)")
        name, caches, masks, to_host, batch = self._saved
        impl = api.get_backend(name)
        steps = caches[0].steps
        n_dirs, hidden = self.directions, self.hidden_size
        dy = api.check_output_gradient(impl, dy, steps, batch, n_dirs * hidden, self.dtype,
                                       self.batch_first, "D*H")
        dh_n, dc_n = self._check_states(impl, d_state, "d_state", batch)
        grads, dh0, dc0 = ([None] * self.num_layers for _ in range(3))
        for layer in reversed(range(self.num_layers)):
            rows = slice(layer * n_dirs, (layer + 1) * n_dirs)
            dx, dh0[layer], dc0[layer], dw_x, dw_h, db = api.backward_layer(
                impl, caches[layer], dy, None if dh_n is None else dh_n[rows],
                None if dc_n is None else dc_n[rows])
            grads[layer] = (dw_x, dw_h, db)
            if layer > 0 and masks:
                impl.scale(dx, masks[layer - 1])
            dy = dx
        if self.batch_first:
            dy = impl.batch_major(dy)
        dx, dh0, dc0 = impl.hand_back([dy, impl.stack(dh0), impl.stack(dc0)], to_host)
        self.grads = []
        for dw_x, dw_h, db in grads:
            dw_x, dw_h, db = impl.hand_back([dw_x, dw_h, db], to_host)
            self.grads.append([LSTMParams(W_x=dw_x[d], W_h=dw_h[d], b=db[d])
                               for d in range(n_dirs)])
        return dx, (dh0, dc0)

    def to_device(self):
        """Keep device copies of the parameters, for repeated ``"cuda"`` calls. Returns self."""
        self.params = [[p.to_device() for p in layer] for layer in self.params]
        return self

    def state_dict(self):
        """The parameters as plain NumPy arrays, keyed ``"l{layer}.d{direction}.{W_x|W_h|b}"``."""
        return {f"l{layer}.d{d}.{field}": getattr(p.to_host(), field).copy()
                for layer, directions in enumerate(self.params)
                for d, p in enumerate(directions) for field in ("W_x", "W_h", "b")}

    def load_state_dict(self, state):
        """Replace the parameters by those of :meth:`state_dict` (shapes and dtype must match)."""
        expected = self.state_dict()
        missing = set(expected) - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        for key, value in state.items():
            if key not in expected:
                raise ValueError(f"state has unknown entry {key!r}")
            check_array(value, key, ndim=expected[key].ndim)
            if value.shape != expected[key].shape:
                raise ValueError(f"{key} must have shape {expected[key].shape}, got {value.shape}")
            if np.dtype(value.dtype) != self.dtype:
                raise TypeError(f"{key} has dtype {value.dtype}, expected {self.dtype}")
        self.params = [[LSTMParams(*(np.array(state[f"l{layer}.d{d}.{field}"])
                                     for field in ("W_x", "W_h", "b")))
                        for d in range(self.directions)] for layer in range(self.num_layers)]

    @classmethod
    def _with_params(cls, params, **options):
        first = params[0][0]
        lstm = cls(first.input_size, first.hidden_size, num_layers=len(params),
                   bidirectional=len(params[0]) == 2, dtype=first.dtype, **options)
        lstm.params = params
        return lstm

    @classmethod
    def from_torch(cls, module, backend="auto"):
        """An LSTM with the weights and options of a ``torch.nn.LSTM``.

        PyTorch's two biases are summed; ``bias=False`` gives zero biases.
        Projections (``proj_size > 0``) are not supported.
        """
        if getattr(module, "proj_size", 0):
            raise ValueError("nblstm does not support LSTM projections (proj_size > 0) yet: "
                             f"module has proj_size={module.proj_size}")
        directions = 2 if module.bidirectional else 1
        params = []
        for layer in range(module.num_layers):
            params.append([])
            for d in range(directions):
                w_ih, w_hh, *biases = (
                    getattr(module, _torch_name(name, layer, d)).detach().cpu().numpy()
                    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")[
                        :4 if module.bias else 2])
                check_float_dtype(w_ih, "module weights")
                bias = biases[0] + biases[1] if biases else np.zeros(w_ih.shape[0], w_ih.dtype)
                params[-1].append(LSTMParams(W_x=np.ascontiguousarray(w_ih.T),
                                             W_h=np.ascontiguousarray(w_hh.T), b=bias))
        return cls._with_params(params, batch_first=module.batch_first,
                                dropout=float(module.dropout), backend=backend)

    def to_torch(self):
        """A ``torch.nn.LSTM`` with these weights (``bias_hh`` zero). Needs torch."""
        import torch

        dtype = torch.float64 if self.dtype == np.float64 else torch.float32
        module = torch.nn.LSTM(self.input_size, self.hidden_size, self.num_layers,
                               batch_first=self.batch_first, dropout=self.dropout,
                               bidirectional=self.bidirectional, dtype=dtype)
        with torch.no_grad():
            for layer, directions in enumerate(self.params):
                for d, p in enumerate(directions):
                    host = p.to_host()
                    values = {"weight_ih": host.W_x.T, "weight_hh": host.W_h.T, "bias_ih": host.b,
                              "bias_hh": np.zeros_like(host.b)}
                    for name, value in values.items():
                        getattr(module, _torch_name(name, layer, d)).copy_(
                            torch.from_numpy(np.array(value)))
        return module

    @classmethod
    def from_keras_weights(cls, kernel, recurrent_kernel, bias, backend="auto"):
        """A one-layer, one-direction LSTM from Keras' weights (gate order i, f, c, o).

        kernel: (I, 4H); recurrent_kernel: (H, 4H); bias: (4H,).
        """
        params = LSTMParams(W_x=np.array(kernel), W_h=np.array(recurrent_kernel),
                            b=np.array(bias))
        return cls._with_params([[params]], backend=backend)

    @classmethod
    def from_onnx_weights(cls, W, R, B=None, backend="auto"):
        """A one-layer LSTM from the ONNX ``LSTM`` operator's inputs (gate order i, o, f, c).

        W: (D, 4H, I); R: (D, 4H, H); B: (D, 8H) or None (zeros). D = 2 means
        bidirectional; the two bias halves are summed.
        """
        for name, value, ndim in (("W", W, 3), ("R", R, 3)):
            check_array(value, name, ndim)
        n_dirs, four_hidden, _ = W.shape
        if n_dirs not in (1, 2) or R.shape != (n_dirs, four_hidden, four_hidden // N_GATES):
            raise ValueError(f"W must be (D, 4H, I) and R (D, 4H, H) with D in (1, 2); got "
                             f"{W.shape} and {R.shape}")
        if B is None:
            B = np.zeros((n_dirs, 2 * four_hidden), W.dtype)
        if B.shape != (n_dirs, 2 * four_hidden):
            raise ValueError(f"B must have shape (D, 8H) = {(n_dirs, 2 * four_hidden)}, "
                             f"got {B.shape}")
        params = [[LSTMParams(W_x=np.ascontiguousarray(_reorder_gates(W[d], ONNX_ORDER, 0).T),
                              W_h=np.ascontiguousarray(_reorder_gates(R[d], ONNX_ORDER, 0).T),
                              b=_reorder_gates(B[d, :four_hidden] + B[d, four_hidden:],
                                               ONNX_ORDER, 0))
                   for d in range(n_dirs)]]
        return cls._with_params(params, backend=backend)

    def to_onnx_weights(self, layer=0):
        """The ONNX ``LSTM`` inputs ``(W (D, 4H, I), R (D, 4H, H), B (D, 8H))`` of one layer.

        The bias goes to the input half of B; the recurrent half is zero.
        """
        hosts = [p.to_host() for p in self.params[layer]]
        w = np.stack([_reorder_gates(p.W_x.T, NBLSTM_ORDER, 0) for p in hosts])
        r = np.stack([_reorder_gates(p.W_h.T, NBLSTM_ORDER, 0) for p in hosts])
        b = np.stack([np.concatenate([_reorder_gates(p.b, NBLSTM_ORDER, 0), np.zeros_like(p.b)])
                      for p in hosts])
        return w, r, b
