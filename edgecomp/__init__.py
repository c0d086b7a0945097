"""edgecomp: a deployment compiler for edge runtimes.

Importing the package loads no runtime (torch, onnxruntime, tensorflow, openvino):
`edgecomp --help` must stay instant. Heavy imports live inside the functions that need them.
"""

__version__ = "0.1.0"
