"""The device side: numpy, onnxruntime, tokenizers and Pillow only. Never torch or transformers.

A test imports this package in a fresh interpreter and fails if torch or transformers load.
"""
