"""Builders of tiny, randomly initialised models with the real architectures and file
layouts (diffusers folders, single files, WD14 ONNX, Florence-2, LLaVA, audio LMs), for the
tests and the offline demo. Outside services/, so no service image ships them."""
