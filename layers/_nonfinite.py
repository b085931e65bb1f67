"""Why a softmax-based loss came out non-finite: the message of its error.

A loss layer tests only its final scalar with ``math.isfinite`` (cheap);
when that fails, the functions here scan the scores once to say which
input made it so.  The scan runs on the host, on failure only.
"""

import numpy as np

from netlite import backend


def undefined_softmax_message(layer, loss, scores, codes, axis):
    """Explain a non-finite softmax loss.

    Parameters
    ----------
    layer : Layer
        Named in the message.
    loss : float
        The non-finite loss.
    scores : Blob
        ``bottom[0]``, viewed as ``(outer, C, inner)`` around ``axis``.
    codes : array of int, shape (at least outer * inner,)
        Label codes (``>= 0`` for a counted position), any array module;
        the first ``outer * inner`` are read.
    axis : int
        The class axis.

    Returns
    -------
    str
        Names the first NaN or +inf score at a counted position (flat
        order) with its index, or else the first counted position whose
        scores are all -inf; in both cases that column's softmax is
        undefined.
    """
    outer = scores.count_range(0, axis)
    inner = scores.count_range(axis + 1)
    x = backend.to_numpy(scores.data).reshape(outer, -1, inner)
    codes = backend.to_numpy(codes).reshape(-1)[: outer * inner]
    valid = codes.reshape(outer, 1, inner) >= 0
    head = f"{layer.describe()}: the loss is {loss}"
    offending = (np.isnan(x) | (x == np.inf)) & valid
    if offending.any():
        flat = int(np.argmax(offending.ravel()))
        where = tuple(int(i) for i in np.unravel_index(flat, scores.shape))
        return (
            f"{head}: bottom[0] (the scores, shape {scores.shape}) holds "
            f"{x.ravel()[flat]} at index {where}, the first NaN or +inf "
            "score at a non-ignored position; the softmax of such a column "
            "is undefined"
        )
    all_neg_inf = (x == -np.inf).all(axis=1) & valid[:, 0, :]
    if all_neg_inf.any():
        i, k = (int(v) for v in np.unravel_index(
            int(np.argmax(all_neg_inf.ravel())), all_neg_inf.shape))
        return (
            f"{head}: every score of position (outer {i}, inner {k}) of "
            f"bottom[0] (the scores, shape {scores.shape}) along axis {axis} "
            "is -inf, so its softmax is undefined"
        )
    return (f"{head}, although bottom[0] (the scores) holds no NaN or +inf "
            "at a non-ignored position")
