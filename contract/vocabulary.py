"""The shared words of the wire contract.

Each word is defined once here and imported by the client, the API and the workers.
"""

from __future__ import annotations

#: Built-in ``torch.nn`` layers a sequential architecture may use. A static list rather than
#: ``getattr(torch.nn, name)``: a user's string never reaches an arbitrary attribute.
ALLOWED_LAYERS = frozenset(
    {
        "Sequential",
        "Identity",
        "Flatten",
        "Unflatten",
        "Linear",
        "Bilinear",
        "Conv1d",
        "Conv2d",
        "Conv3d",
        "ConvTranspose1d",
        "ConvTranspose2d",
        "Embedding",
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "LayerNorm",
        "GroupNorm",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "RMSNorm",
        "ReLU",
        "ReLU6",
        "LeakyReLU",
        "ELU",
        "SELU",
        "CELU",
        "GELU",
        "SiLU",
        "Mish",
        "Tanh",
        "Sigmoid",
        "Softplus",
        "Softsign",
        "Hardtanh",
        "Hardswish",
        "Hardsigmoid",
        "LogSigmoid",
        "Softmax",
        "LogSoftmax",
        "Dropout",
        "Dropout1d",
        "Dropout2d",
        "MaxPool1d",
        "MaxPool2d",
        "MaxPool3d",
        "AvgPool1d",
        "AvgPool2d",
        "AvgPool3d",
        "AdaptiveAvgPool1d",
        "AdaptiveAvgPool2d",
        "AdaptiveMaxPool2d",
        "Upsample",
        "ZeroPad2d",
    }
)
#: Builders shipped with the worker (``fimntk.worker.models``); a lab adds more through
#: ``Settings.builder_modules``.
BUILTIN_BUILDERS = frozenset({"mlp", "cnn", "resnet"})
#: Buffers that built-in layers put in a state dict; they are not parameters.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
