"""The NumPy oracle: a plain time loop over the equations in DESIGN.md.

Written to be obviously correct, not fast: one step at a time, the weight
gradients accumulated step by step, no fused tricks. It computes in the dtype of
its inputs, so float64 inputs make it the verification oracle and float32
inputs make it the ``"numpy"`` backend.

Gate order along 4H is i, f, g, o.
"""
import numpy as np


def sigmoid(z):
    """Logistic function; ``exp`` only sees ``-|z|``, so nothing overflows."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def forward(x, w_x, w_h, b, h0, c0):
    """Run the LSTM over a whole sequence.

    Parameters
    ----------
    x : (T, B, I) array
    w_x : (I, 4H) array
    w_h : (H, 4H) array
    b : (4H,) array
    h0, c0 : (B, H) arrays

    Returns
    -------
    y : (T, B, H) hidden state of every step
    gates : (T, B, 4H) post-activation gates i, f, g, o
    hidden_states, cell_states : (T+1, B, H) states, row 0 the initial state
    """
    steps = x.shape[0]
    hidden = w_h.shape[0]
    gates = np.empty((steps, x.shape[1], 4 * hidden), x.dtype)
    hidden_states = np.empty((steps + 1,) + h0.shape, x.dtype)
    cell_states = np.empty_like(hidden_states)
    hidden_states[0], cell_states[0] = h0, c0
    with np.errstate(all="ignore"):
        for t in range(steps):
            z = x[t] @ w_x + hidden_states[t] @ w_h + b
            i = sigmoid(z[:, :hidden])
            f = sigmoid(z[:, hidden:2 * hidden])
            g = np.tanh(z[:, 2 * hidden:3 * hidden])
            o = sigmoid(z[:, 3 * hidden:])
            cell_states[t + 1] = f * cell_states[t] + i * g
            hidden_states[t + 1] = o * np.tanh(cell_states[t + 1])
            gates[t] = np.concatenate([i, f, g, o], axis=1)
    return hidden_states[1:].copy(), gates, hidden_states, cell_states


def backward(x, w_x, w_h, gates, hidden_states, cell_states, dy, dh_n, dc_n):
    """Backpropagation through time.

    Parameters
    ----------
    x : (T, B, I) array
    w_x : (I, 4H) array
    w_h : (H, 4H) array
    gates : (T, B, 4H) post-activation gates from :func:`forward`
    hidden_states, cell_states : (T+1, B, H) from :func:`forward`
    dy : (T, B, H) array or None
        Gradient of the loss with respect to y.
    dh_n, dc_n : (B, H) arrays
        Gradient with respect to the final states.

    Returns
    -------
    dx : (T, B, I)
    dh0, dc0 : (B, H)
    dw_x : (I, 4H)
    dw_h : (H, 4H)
    db : (4H,)
    """
    steps = x.shape[0]
    hidden = w_h.shape[0]
    dx = np.empty_like(x)
    dw_x = np.zeros_like(w_x)
    dw_h = np.zeros_like(w_h)
    db = np.zeros(4 * hidden, x.dtype)
    dh = dh_n.copy()
    dc = dc_n.copy()
    with np.errstate(all="ignore"):
        for t in reversed(range(steps)):
            if dy is not None:
                dh = dh + dy[t]
            i = gates[t][:, :hidden]
            f = gates[t][:, hidden:2 * hidden]
            g = gates[t][:, 2 * hidden:3 * hidden]
            o = gates[t][:, 3 * hidden:]
            tanh_c = np.tanh(cell_states[t + 1])
            dc = dc + dh * o * (1 - tanh_c ** 2)
            dz = np.concatenate([
                dc * g * i * (1 - i),
                dc * cell_states[t] * f * (1 - f),
                dc * i * (1 - g ** 2),
                dh * tanh_c * o * (1 - o),
            ], axis=1)
            dc = dc * f
            dw_x += x[t].T @ dz
            dw_h += hidden_states[t].T @ dz
            db += dz.sum(axis=0)
            dx[t] = dz @ w_x.T
            dh = dz @ w_h.T
    return dx, dh, dc, dw_x, dw_h, db
