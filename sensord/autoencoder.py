"""Keras autoencoders (training only: importing this module imports TensorFlow).

Every variant maps a (length, channels) window to a (length, channels)
reconstruction, so the serving path treats them all alike. An *ensemble* of K
members maps it to (K, length, channels): the members run side by side in one
graph (one TFLite interpreter call per batch) and the scorer averages their
errors. Averaging members that differ only in their random initialisation is
what makes the score, and so the alerts, independent of the seed.
"""

from __future__ import annotations

from .tflib import import_tensorflow

import_tensorflow()  # quietly, before keras pulls TensorFlow in

import keras  # noqa: E402
import numpy as np  # noqa: E402

from .config import ModelConfig  # noqa: E402


def output_activation(cfg: ModelConfig, scaler_kind: str) -> str:
    """Sigmoid only when inputs live in [0, 1] (min-max scaling); linear otherwise."""
    if cfg.output_activation != "auto":
        return cfg.output_activation
    return "sigmoid" if scaler_kind == "minmax" else "linear"


def _dense(cfg: ModelConfig, x: keras.KerasTensor, length: int, channels: int, out_act: str) -> keras.KerasTensor:
    reg = keras.regularizers.l2(cfg.l2) if cfg.l2 > 0 else None
    h = keras.layers.Flatten()(x)
    for units in cfg.encoder_units:
        h = keras.layers.Dense(units, activation="relu", kernel_regularizer=reg)(h)
        if cfg.dropout > 0:
            h = keras.layers.Dropout(cfg.dropout)(h)
    h = keras.layers.Dense(cfg.latent_units, activation="relu", name="latent", kernel_regularizer=reg)(h)
    for units in reversed(cfg.encoder_units):
        h = keras.layers.Dense(units, activation="relu", kernel_regularizer=reg)(h)
    h = keras.layers.Dense(length * channels, activation=out_act)(h)
    return keras.layers.Reshape((length, channels))(h)


def _conv1d(cfg: ModelConfig, x: keras.KerasTensor, length: int, channels: int, out_act: str) -> keras.KerasTensor:
    # conv_stride > 1 compresses time as well as channels (SKAB's Conv-AE uses 2): each encoder layer
    # halves the length, each decoder layer upsamples it back, and the overhang of a length that does
    # not divide evenly is cropped off the end. With stride 1 the graph is the plain one.
    s = cfg.conv_stride
    h = x
    for filters in cfg.conv_filters:
        h = keras.layers.Conv1D(filters, cfg.kernel_size, strides=s, padding="same", activation="relu")(h)
        if cfg.dropout > 0:
            h = keras.layers.Dropout(cfg.dropout)(h)
    h = keras.layers.Conv1D(cfg.latent_units, cfg.kernel_size, padding="same", activation="relu", name="latent")(h)
    for filters in reversed(cfg.conv_filters):
        if s > 1:
            h = keras.layers.UpSampling1D(s)(h)
        h = keras.layers.Conv1D(filters, cfg.kernel_size, padding="same", activation="relu")(h)
    h = keras.layers.Conv1D(channels, cfg.kernel_size, padding="same", activation=out_act)(h)
    overhang = int(h.shape[1]) - length
    return keras.layers.Cropping1D((0, overhang))(h) if overhang > 0 else h


def _lstm(cfg: ModelConfig, x: keras.KerasTensor, length: int, channels: int, out_act: str) -> keras.KerasTensor:
    # unroll=True: the window length is fixed, and an unrolled LSTM converts to
    # plain TFLite builtins that accept any batch size.
    h = x
    for units in cfg.lstm_units:
        h = keras.layers.LSTM(units, return_sequences=True, unroll=True)(h)
    h = keras.layers.LSTM(cfg.latent_units, unroll=True, name="latent")(h)
    h = keras.layers.RepeatVector(length)(h)
    for units in reversed(cfg.lstm_units):
        h = keras.layers.LSTM(units, return_sequences=True, unroll=True)(h)
    return keras.layers.TimeDistributed(keras.layers.Dense(channels, activation=out_act))(h)


_BUILDERS = {"dense": _dense, "conv1d": _conv1d, "lstm": _lstm}


def build_autoencoder(cfg: ModelConfig, length: int, channels: int, scaler_kind: str,
                      noise_std: float = 0.0, members: int = 1) -> keras.Model:
    """One autoencoder, or ``members`` of them stacked on a member axis (B, K, length, channels).

    Each member is its own sub-model (its own "latent" layer), initialised from
    the global Keras seed in turn, so K members from seed s share nothing with
    those from seed s + 1.
    """
    if cfg.kind == "pca":
        raise ValueError("model.kind 'pca' is fitted in closed form: use build_pca_autoencoder")
    inp = keras.Input((length, channels), name="window")
    x = keras.layers.GaussianNoise(noise_std)(inp) if noise_std > 0 else inp
    out_act = output_activation(cfg, scaler_kind)
    if members == 1:
        out = _BUILDERS[cfg.kind](cfg, x, length, channels, out_act)
        return keras.Model(inp, out, name=f"sensord_{cfg.kind}_ae")
    outs = []
    for k in range(members):
        m_in = keras.Input((length, channels), name=f"member{k}_window")
        member = keras.Model(m_in, _BUILDERS[cfg.kind](cfg, m_in, length, channels, out_act), name=f"member{k}")
        outs.append(keras.layers.Reshape((1, length, channels), name=f"member{k}_stack")(member(x)))
    out = keras.layers.Concatenate(axis=1, name="members")(outs)
    return keras.Model(inp, out, name=f"sensord_{cfg.kind}_ensemble{members}")


def member_model(ensemble: keras.Model, k: int, noise_std: float = 0.0) -> keras.Model:
    """Member ``k`` of an ensemble from :func:`build_autoencoder` as a model of its own.

    It shares the member's layers, so fitting it trains that member in place and leaves the others alone:
    a cross-fitted ensemble trains each member on its own rows and is then served (and saved) as the one
    stacked graph, exactly like a seed ensemble.
    """
    member = ensemble.get_layer(f"member{k}")
    _, length, channels = ensemble.inputs[0].shape
    inp = keras.Input((length, channels), name="window")
    x = keras.layers.GaussianNoise(noise_std)(inp) if noise_std > 0 else inp
    return keras.Model(inp, member(x), name=f"sensord_member{k}")


def build_pca_autoencoder(components: np.ndarray, mean: np.ndarray, length: int, channels: int) -> keras.Model:
    """The linear autoencoder: PCA's projection onto ``components`` and back, as two Dense layers.

    ``components`` is (k, length * channels) with orthonormal rows and ``mean``
    the flattened training mean, so ``x -> (x - mean) V^T V + mean`` is the
    reconstruction whose squared error is SKAB's Q statistic. As a Keras model
    it converts to the same TFLite flatbuffer format as the networks, so the
    baseline is served, thresholded and evaluated by exactly the same code.
    """
    k, d = components.shape
    inp = keras.Input((length, channels), name="window")
    h = keras.layers.Flatten()(inp)
    enc = keras.layers.Dense(k, name="latent")
    dec = keras.layers.Dense(d, name="reconstruction")
    z = enc(h)
    out = keras.layers.Reshape((length, channels))(dec(z))
    model = keras.Model(inp, out, name="sensord_pca_ae")
    v = components.astype(np.float32)
    mu = mean.astype(np.float32)
    enc.set_weights([v.T, -(mu @ v.T)])
    dec.set_weights([v, mu])
    return model
