"""Gatehouse's training module: pure PyTorch, never imports Django.

Entry points: `python -m training prepare|train|merge|eval` (see training/cli.py).
"""
