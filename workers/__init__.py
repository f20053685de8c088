"""The expert side: an expert worker holding a group of experts for every layer and running batched
SwiGLU on whatever token batch it is sent (expert.py). Imports model/ only; never Ray.
"""
