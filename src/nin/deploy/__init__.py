"""Deployment: a trained model out of Python (`export`: ONNX, TorchScript, OpenVINO), the same model through
other engines (`backends`), and behind HTTP (`serve`, with its page in `static/`)."""
