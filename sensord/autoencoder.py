"""Keras autoencoders (training only: importing this module imports TensorFlow).

Every variant maps a (length, channels) window to a (length, channels)
reconstruction, so the serving path treats them all alike.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

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
    h = x
    for filters in cfg.conv_filters:
        h = keras.layers.Conv1D(filters, cfg.kernel_size, padding="same", activation="relu")(h)
        if cfg.dropout > 0:
            h = keras.layers.Dropout(cfg.dropout)(h)
    h = keras.layers.Conv1D(cfg.latent_units, cfg.kernel_size, padding="same", activation="relu", name="latent")(h)
    for filters in reversed(cfg.conv_filters):
        h = keras.layers.Conv1D(filters, cfg.kernel_size, padding="same", activation="relu")(h)
    return keras.layers.Conv1D(channels, cfg.kernel_size, padding="same", activation=out_act)(h)


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
                      noise_std: float = 0.0) -> keras.Model:
    inp = keras.Input((length, channels), name="window")
    x = keras.layers.GaussianNoise(noise_std)(inp) if noise_std > 0 else inp
    out = _BUILDERS[cfg.kind](cfg, x, length, channels, output_activation(cfg, scaler_kind))
    return keras.Model(inp, out, name=f"sensord_{cfg.kind}_ae")
