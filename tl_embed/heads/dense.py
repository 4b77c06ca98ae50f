"""The tutorials' head, ``--head dense``: Dropout + Dense softmax (optionally one hidden ReLU layer)
trained with Keras on the cached embeddings, early-stopped on a validation split.

The standardisation is done in numpy and folded into the first dense layer afterwards, and dropout
is the identity at inference, so the fitted head is just ``dense relu -> dense softmax`` steps
(:mod:`.graph`).  After early stopping finds the number of epochs, the head is trained again from
scratch on all rows (train + validation) for that many epochs, as the linear heads are refitted.
TensorFlow is imported only here, inside :func:`fit_dense`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import TlEmbedError
from .convert import fold_standardisation
from .graph import Step

VALIDATION = 0.15  # held out for early stopping
MAX_EPOCHS = 300
PATIENCE = 20  # epochs without a better validation loss before stopping
BATCH = 32
DROPOUT = 0.2  # TF-Hub make_image_classifier's default
L2 = 1e-4  # its kernel regulariser


def fit_dense(X: np.ndarray, y: np.ndarray, classes: list[str], hidden: int = 0,
              class_weight: str | None = None, seed: int = 0,
              params: dict[str, Any] | None = None) -> tuple[list[Step], dict[str, Any], dict[str, Any]]:
    """(steps, params, info) of the dense head; ``params`` with ``epochs`` skips the early stopping."""
    import time

    from sklearn.model_selection import train_test_split
    from sklearn.utils.class_weight import compute_class_weight

    if hidden < 0:
        raise TlEmbedError("--hidden must be 0 (no hidden layer) or a number of units")
    params = dict(params or {})
    hidden = int(params.get("hidden", hidden))
    idx = np.searchsorted(classes, y)
    weights = None
    if class_weight == "balanced":
        weights = dict(enumerate(compute_class_weight("balanced", classes=np.arange(len(classes)), y=idx)))
    mean, std = X.mean(0, dtype=np.float64), X.std(0, dtype=np.float64)
    std[std < 1e-12] = 1.0  # constant features, as StandardScaler does
    X = ((X - mean) / std).astype(np.float32)
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    epochs = params.get("epochs")
    if epochs is None:
        counts = np.bincount(idx)
        if counts.min() < 2:
            raise TlEmbedError("the dense head needs at least 2 images per class (one for early stopping)")
        n_val = max(int(round(VALIDATION * len(idx))), len(classes))
        tr, va = train_test_split(np.arange(len(idx)), test_size=n_val, stratify=idx, random_state=seed)
        model, history = _train(X[tr], idx[tr], len(classes), hidden, seed, weights, (X[va], idx[va]), MAX_EPOCHS)
        losses = history["val_loss"]
        epochs = int(np.argmin(losses)) + 1
        info.update(validation_accuracy=float(history["val_accuracy"][epochs - 1]), validation_rows=len(va),
                    cv_accuracy=float(history["val_accuracy"][epochs - 1]))
    info["search_seconds"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    model, _ = _train(X, idx, len(classes), hidden, seed, weights, None, int(epochs))
    info["fit_seconds"] = time.perf_counter() - t1
    return _steps(model, mean, std), {"hidden": hidden, "epochs": int(epochs)}, info


def _train(X: np.ndarray, idx: np.ndarray, n_classes: int, hidden: int, seed: int, weights: dict | None,
           validation: tuple[np.ndarray, np.ndarray] | None, epochs: int) -> tuple[Any, dict[str, list[float]]]:
    """A Keras model trained on (standardised) X by minibatch Adam, and its validation history.

    One compiled ``tf.function`` runs a whole epoch: ``Model.fit`` pays a fixed cost per epoch
    (iterators, callbacks), which for a few hundred small epochs would be most of the time.
    With ``validation``, training stops ``PATIENCE`` epochs after the best validation loss.
    """
    from ..tf_quiet import import_tensorflow

    tf = import_tensorflow()

    tf.keras.utils.set_random_seed(seed)
    layers: list = [tf.keras.Input((X.shape[1],))]
    if hidden:
        layers += [tf.keras.layers.Dropout(DROPOUT), tf.keras.layers.Dense(hidden, "relu")]
    layers += [tf.keras.layers.Dropout(DROPOUT), tf.keras.layers.Dense(n_classes, "softmax")]
    model = tf.keras.Sequential(layers)
    kernels = [layer.kernel for layer in model.layers if isinstance(layer, tf.keras.layers.Dense)]
    optimizer, xent = tf.keras.optimizers.Adam(1e-3), tf.keras.losses.SparseCategoricalCrossentropy()
    w = np.ones(len(idx), np.float32) if weights is None else np.array([weights[i] for i in idx], np.float32)
    Xt, yt, wt = tf.constant(X), tf.constant(idx), tf.constant(w)
    n = len(idx)

    @tf.function
    def run_epoch(order):
        for start in tf.range(0, n, BATCH):
            rows = order[start:start + BATCH]
            with tf.GradientTape() as tape:
                p = model(tf.gather(Xt, rows), training=True)
                loss = xent(tf.gather(yt, rows), p, tf.gather(wt, rows))
                loss += L2 * tf.add_n([tf.reduce_sum(k * k) for k in kernels])
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                          model.trainable_variables, strict=True))

    history: dict[str, list[float]] = {"val_loss": [], "val_accuracy": []}
    for _ in range(epochs):
        run_epoch(tf.random.shuffle(tf.range(n)))
        if validation is None:
            continue
        p = model(validation[0], training=False).numpy()
        history["val_loss"].append(float(xent(validation[1], p)))
        history["val_accuracy"].append(float((p.argmax(1) == validation[1]).mean()))
        if len(history["val_loss"]) - 1 - int(np.argmin(history["val_loss"])) >= PATIENCE:
            break
    return model, history


def _steps(model, mean: np.ndarray, std: np.ndarray) -> list[Step]:
    """The model as steps: the standardisation folded into the first dense layer, dropout dropped."""
    dense = [layer for layer in model.layers if layer.__class__.__name__ == "Dense"]
    steps = []
    for i, layer in enumerate(dense):
        W, b = (np.asarray(w, dtype=np.float64) for w in layer.get_weights())
        if i == 0:
            W, b = fold_standardisation(W, b, mean, std)
        steps.append(Step("dense", {"W": W, "b": b}, {"activation": layer.get_config()["activation"]}))
    return steps
