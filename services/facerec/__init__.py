"""The face service: dlib detection, landmarks and 128-d embeddings, FER expressions, and memes.

A pure library: the worker runtime loads `services.facerec.predictors` by name (see predictors.py).
"""
