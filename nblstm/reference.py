"""The NumPy oracle: a plain time loop over the equations in DESIGN.md.

Written to be obviously correct, not fast: one step at a time, the weight
gradients accumulated step by step, no fused tricks. It computes in the dtype of
its inputs, so float64 inputs make it the verification oracle and float32
inputs make it the ``"numpy"`` backend.

Variable lengths follow PyTorch's packed sequences: row b takes part in steps
``0 .. lengths[b]-1`` only. At step s the forward direction reads time s; the
reverse direction reads time ``lengths[b]-1-s``, so each sequence is reversed
within its own length. Inactive rows keep their state, output zeros and pass
gradients through untouched.

Gate order along 4H is i, f, g, o.
"""
import numpy as np


def sigmoid(z):
    """Logistic function; ``exp`` only sees ``-|z|``, so nothing overflows."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


def step_times(step, lengths, reverse):
    """Per row: whether it is active at ``step``, and the time index it reads.

    Inactive rows point at time ``step``, which lies in their padding, so
    every (time, row) is visited exactly once over all steps.
    """
    active = step < lengths
    times = lengths - 1 - step if reverse else np.full_like(lengths, step)
    return active, np.where(active, times, step)


def forward(x, w_x, w_h, b, h0, c0, lengths=None, reverse=False):
    """Run one direction of one LSTM layer over a whole batch.

    Parameters
    ----------
    x : (T, B, I) array
    w_x : (I, 4H) array
    w_h : (H, 4H) array
    b : (4H,) array
    h0, c0 : (B, H) arrays
    lengths : (B,) integer array or None
        Valid steps per row (all T when None).
    reverse : bool
        Run each sequence backwards within its length.

    Returns
    -------
    y : (T, B, H) hidden state at every time, zero at padded times
    gates : (T, B, 4H) post-activation gates i, f, g, o by time (zero at padding)
    hidden_states, cell_states : (T+1, B, H)
        Row t < T holds the state entering time t (the carried state at
        padding); row T the final state.
    """
    steps, batch = x.shape[:2]
    hidden = w_h.shape[0]
    lengths = np.full(batch, steps) if lengths is None else np.asarray(lengths)
    rows = np.arange(batch)
    y = np.zeros((steps, batch, hidden), x.dtype)
    gates = np.zeros((steps, batch, 4 * hidden), x.dtype)
    hidden_states = np.empty((steps + 1, batch, hidden), x.dtype)
    cell_states = np.empty_like(hidden_states)
    h, c = h0.copy(), c0.copy()
    with np.errstate(all="ignore"):
        for step in range(steps):
            active, times = step_times(step, lengths, reverse)
            hidden_states[times, rows] = h
            cell_states[times, rows] = c
            z = x[times, rows] @ w_x + h @ w_h + b
            i = sigmoid(z[:, :hidden])
            f = sigmoid(z[:, hidden:2 * hidden])
            g = np.tanh(z[:, 2 * hidden:3 * hidden])
            o = sigmoid(z[:, 3 * hidden:])
            c_new = f * c + i * g
            h_new = o * np.tanh(c_new)
            keep = active[:, None]
            c = np.where(keep, c_new, c)
            h = np.where(keep, h_new, h)
            y[times, rows] = np.where(keep, h_new, 0)
            gates[times, rows] = np.where(keep, np.concatenate([i, f, g, o], axis=1), 0)
    hidden_states[steps], cell_states[steps] = h, c
    return y, gates, hidden_states, cell_states


def backward(x, w_x, w_h, gates, hidden_states, cell_states, dy, dh_n, dc_n, lengths=None,
             reverse=False):
    """Backpropagation through time for one direction of one layer.

    Parameters
    ----------
    x : (T, B, I) array
    w_x : (I, 4H) array
    w_h : (H, 4H) array
    gates : (T, B, 4H) post-activation gates from :func:`forward`
    hidden_states, cell_states : (T+1, B, H) from :func:`forward`
    dy : (T, B, H) array or None
        Gradient of the loss with respect to y (ignored at padded times).
    dh_n, dc_n : (B, H) arrays
        Gradient with respect to the final states.
    lengths, reverse : as in :func:`forward`

    Returns
    -------
    dx : (T, B, I)
    dh0, dc0 : (B, H)
    dw_x : (I, 4H)
    dw_h : (H, 4H)
    db : (4H,)
    """
    steps, batch = x.shape[:2]
    hidden = w_h.shape[0]
    lengths = np.full(batch, steps) if lengths is None else np.asarray(lengths)
    rows = np.arange(batch)
    dx = np.zeros_like(x)
    dw_x = np.zeros_like(w_x)
    dw_h = np.zeros_like(w_h)
    db = np.zeros(4 * hidden, x.dtype)
    dh = dh_n.copy()
    dc = dc_n.copy()
    with np.errstate(all="ignore"):
        for step in reversed(range(steps)):
            active, times = step_times(step, lengths, reverse)
            keep = active[:, None]
            if dy is not None:
                dh = dh + np.where(keep, dy[times, rows], 0)
            step_gates = gates[times, rows]
            i = step_gates[:, :hidden]
            f = step_gates[:, hidden:2 * hidden]
            g = step_gates[:, 2 * hidden:3 * hidden]
            o = step_gates[:, 3 * hidden:]
            c_prev = cell_states[times, rows]
            tanh_c = np.tanh(f * c_prev + i * g)
            dc_total = dc + dh * o * (1 - tanh_c ** 2)
            dz = np.concatenate([
                dc_total * g * i * (1 - i),
                dc_total * c_prev * f * (1 - f),
                dc_total * i * (1 - g ** 2),
                dh * tanh_c * o * (1 - o),
            ], axis=1)
            dz = np.where(keep, dz, 0)
            dw_x += np.where(keep, x[times, rows], 0).T @ dz
            dw_h += np.where(keep, hidden_states[times, rows], 0).T @ dz
            db += dz.sum(axis=0)
            dx[times, rows] = dz @ w_x.T
            dh = np.where(keep, dz @ w_h.T, dh)
            dc = np.where(keep, dc_total * f, dc)
    return dx, dh, dc, dw_x, dw_h, db
