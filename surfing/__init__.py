"""Surfing: invert trained generative networks by following their training trajectory.

Song, Fan & Lafferty (2019): instead of descending f_T(x) = 1/2 ||A G_T(x) - A y||^2 on the
final network only, descend f_0, ..., f_T on the checkpoints recorded during training,
warm-starting each stage from the previous optimum.
"""
